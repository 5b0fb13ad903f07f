"""Fast Q4_0 / Q8_0 / IQ4_NL matrix-vector and matrix-matrix products, written as explicit LLVM vector IR.

Why IR and not plain Numba loops: LLVM does not auto-vectorize nibble unpacking followed by
per-block reductions (plain ``@njit`` loops reach 1-2.5 GB/s of weights on the 2-vCPU Zen 3 dev
box, see /work/shared/notes/q4-kernel-findings.md). Here the whole row loop is emitted with
llvmlite's IR builder through ``numba.extending.intrinsic``: one loop with phi nodes over the
ggml blocks, the blocks read in place, 8 float accumulator lanes that live across the row and one
horizontal sum per row.

Data contract (identical to ggml):

* weights are the raw ggml bytes of a row-major matrix, ``uint8[n_out, row_bytes]``:
  ``block_q4_0`` = fp16 ``d`` + 16 bytes, byte ``j`` holds element ``j`` in its low nibble and
  element ``j + 16`` in its high nibble, value = ``d * (nibble - 8)`` (18 bytes per 32 weights);
  ``block_q8_0`` = fp16 ``d`` + 32 int8, value = ``d * q`` (34 bytes per 32 weights);
  ``block_iq4_nl`` = Q4_0's layout with each nibble an index into ggml's 16 non-linear values
  (``kvalues_iq4nl``), looked up in registers, then Q8_0's block product.
* activations are quantized once per product by :func:`quantize_activations_q8_0`, bit-identical
  to ``gguf.quants.quantize(x, Q8_0)`` (ggml's ``quantize_row_q8_0_ref``): int8 values in
  [-127, 127], one float32 scale per 32-block whose value is exactly the fp16 scale ggml stores,
  and per block the int32 sum of the int8 values (the Q4_0 "-8" offset becomes
  ``- 8 * sum(x_block)``, so the nibbles can stay unsigned 0..15 for ``pmaddubsw``).

Every block product is computed exactly in integers; the float result is
``sum_b float(idot_b) * fp32(d_w,b * d_x,b)`` up to float summation order (8 lanes x blocks, then
a fixed tree); see :func:`row_dot_error_bound` for the bound the tests check.

Kernel variants ("ISA"): ``kernel_isa()`` is the single place that picks the host-specific IR
("avx2": ``llvm.x86.avx2.pmadd.ub.sw`` / ``pmadd.wd`` / ``psign.b``; "avx2-vnni": the same with
one ``vpdpbusd`` in place of the two multiply-adds, on CPUs with AVX-VNNI / AVX512-VNNI;
"avx512-vnni": also 512-bit prompt tiles; "neon-dotprod": arm64 ``llvm.aarch64.neon.sdot``, whose
lanes equal the x86 ones, so results are bit-identical to x86's) or the portable one ("generic":
only target-independent LLVM vector ops that LLVM lowers to SSE/AVX/NEON). Every driver has a
``*_generic`` twin so the portable IR can be run (and tested) on any host.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.kernels.cpu_target import is_arm64, numba_target_features

QK = 32  # elements per ggml block (Q4_0 and Q8_0)
X86_ISAS = ("avx2", "avx2-vnni", "avx512-vnni")  # the IR flavours that use x86 intrinsics
Q4_0_BLOCK_BYTES = 18
Q8_0_BLOCK_BYTES = 34

__all__ = [
    "QK",
    "Q4_0_BLOCK_BYTES",
    "Q8_0_BLOCK_BYTES",
    "kernel_isa",
    "quantize_activations_q8_0",
    "quantize_activations_q8_0_batch",
    "q4_0_row_dot",
    "q4_0_row_dot_generic",
    "q8_0_row_dot",
    "q8_0_row_dot_generic",
    "matvec_q4_0",
    "matvec_q4_0_generic",
    "matvec_q8_0",
    "matvec_q8_0_generic",
    "matmul_q4_0",
    "matmul_q4_0_generic",
    "matmul_q8_0",
    "matmul_q8_0_generic",
    "matmul_q4_0_x8",
    "matmul_q8_0_x8",
    "repack_q4_0_x8",
    "repack_q8_0_x8",
    "standalone_row_dot_ir",
    "q4_0_block_dots_ref",
    "q8_0_block_dots_ref",
    "q4_0_row_dot_ref",
    "q8_0_row_dot_ref",
    "matvec_q4_0_ref",
    "matvec_q8_0_ref",
    "row_dot_error_bound",
]


# --------------------------------------------------------------------------------------------
# ISA selection: the one place that decides which IR the "host" kernels emit.
# --------------------------------------------------------------------------------------------


def _target_features() -> set[str]:
    """CPU features Numba compiles for (see cpu_target: NUMBA_CPU_FEATURES, else the host's)."""
    return numba_target_features()


@functools.cache
def kernel_isa() -> str:
    """The IR flavour the host kernels use: "avx512-vnni", "avx2-vnni", "avx2", "neon-dotprod" or
    "generic".

    Evaluated lazily, at the first kernel compilation (not at import). It must agree with the
    features Numba targets, because Numba's on-disk cache is keyed by CPU name and features:
    a cache built here is never loaded on a CPU with other features. On arm64 the dot-product
    extension (Armv8.2 ``sdot``: Raspberry Pi 5, Apple M, Graviton 2+) is among those features when
    the hardware has it (cpu_target completes LLVM's detection at start-up); without it (Cortex-A72,
    Raspberry Pi 4) the portable IR runs, which LLVM lowers to plain NEON.
    """
    features = _target_features()
    if is_arm64():
        return "neon-dotprod" if "dotprod" in features else "generic"
    # f16c for the one-instruction fp16 -> fp32 scale conversion, fma for the accumulation.
    if {"avx2", "fma", "f16c"} <= features:
        # VNNI's vpdpbusd (u8 x s8, 4 products into each i32 lane, no intermediate saturation)
        # replaces pmaddubsw + pmaddwd: the 256-bit form needs AVX-VNNI or AVX512-VNNI with VL.
        if {"avx512f", "avx512bw", "avx512vl", "avx512vnni"} <= features:
            return "avx512-vnni"  # as avx2-vnni, plus 512-bit prompt tiles (two groups per vpdpbusd)
        if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
            return "avx2-vnni"
        return "avx2"
    return "generic"


def has_x8_kernels() -> bool:
    """Whether the 8-row interleaved prompt kernels (x86 AVX2 code) exist for this CPU."""
    return kernel_isa() in X86_ISAS


# --------------------------------------------------------------------------------------------
# IR emission
# --------------------------------------------------------------------------------------------

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F16 = ir.HalfType()
_F32 = ir.FloatType()
_V16I8 = ir.VectorType(_I8, 16)
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V32I16 = ir.VectorType(_I16, 32)
_V8I32 = ir.VectorType(_I32, 8)
_V8F32 = ir.VectorType(_F32, 8)
# Software prefetch distance for the weight stream, in bytes ahead of the block being read
# (0 = off). A prefetch never faults (x86 PREFETCHh, arm64 PRFM), so running past the end of a row
# is harmless. The hint is T0 (locality 3: into every cache level). Measured on an Intel Xeon
# (Sapphire Rapids class, 1 thread, Q4_0 4096 x 4096 matrix-vector): the non-temporal hint
# (locality 0, PREFETCHNTA) held the kernel to 6.0 GB/s in L3 and 8.1 GB/s streaming a 377 MB
# matrix from DRAM, against 17.4 and 13.3 GB/s with T0 (no prefetch: 17.3 and 4.8). On the
# Zen 3 box the non-temporal hint had measured +4-13% over no prefetch from DRAM.
_PREFETCH_BYTES = 2048
_PREFETCH_LOCALITY = 3
_LANES = 8  # float accumulator lanes per (row, token) pair: one AVX2 register


def _vconst(vec_type: ir.VectorType, value: int | float) -> ir.Constant:
    return ir.Constant(vec_type, [value] * vec_type.count)


def _mask(indices) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(indices)), list(indices))


def emit_f16_bits_to_f32(b: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """float32 value of the IEEE half with i16 ``bits``, in integer operations only (no F16C, no
    library call) and without ever computing on a float32 subnormal.

    A normal half is a float with its exponent re-biased (+112 = 127 - 15) and its mantissa moved up
    13 bits. A subnormal half is its 10-bit mantissa times 2**-24, exact as a float32 (normal) value.
    The older form, the bits shifted into a float (the value times 2**-112) then multiplied by
    2**112, is exact too, but that float is subnormal whenever the half is: one microcode assist per
    conversion on Intel cores, which made Q6_K products 4x slower on files with tiny scales. inf/nan
    are not valid ggml scales (they come out as 2**16 and so on, as before).
    """
    wide = b.zext(bits, _I32)
    sign = b.shl(b.and_(wide, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    magnitude = b.and_(wide, ir.Constant(_I32, 0x7FFF))
    normal = b.add(b.shl(magnitude, ir.Constant(_I32, 13)), ir.Constant(_I32, 112 << 23))
    subnormal = b.bitcast(b.fmul(b.uitofp(magnitude, _F32), ir.Constant(_F32, 2.0**-24)), _I32)
    is_subnormal = b.icmp_unsigned("<", magnitude, ir.Constant(_I32, 0x400))
    return b.bitcast(b.or_(sign, b.select(is_subnormal, subnormal, normal)), _F32)


def emit_prefetch(b: ir.IRBuilder, ptr_i8: ir.Value, ahead_bytes: int) -> None:
    """A read prefetch of the cache line ``ahead_bytes`` past ``ptr_i8`` (nothing when 0)."""
    if not ahead_bytes:
        return
    # llvm.prefetch(address, rw=0 read, locality, cache type=1 data)
    prefetch = cgutils.get_or_insert_function(
        b.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0"
    )
    ahead = b.gep(ptr_i8, [ir.Constant(_I64, ahead_bytes)])
    b.call(prefetch, [ahead, ir.Constant(_I32, 0), ir.Constant(_I32, _PREFETCH_LOCALITY), ir.Constant(_I32, 1)])


class _Loop:
    """``for index in range(n_iters)`` with loop-carried values, as basic blocks and phi nodes::

        loop = _Loop(builder, n_iters, initial_values, "name")  # the builder is now in the body
        ...  # emit the body from loop.index and loop.values
        finals = loop.close(new_values)                        # the builder is now after the loop
    """

    def __init__(self, b: ir.IRBuilder, n_iters: ir.Value, initial: list[ir.Value], name: str):
        self.b = b
        entry = b.basic_block
        self.header = b.function.append_basic_block(f"{name}.header")
        body = b.function.append_basic_block(f"{name}.body")
        self.after = b.function.append_basic_block(f"{name}.after")
        b.branch(self.header)
        b.position_at_end(self.header)
        self.index = b.phi(_I64, name=f"{name}.i")
        self.index.add_incoming(ir.Constant(_I64, 0), entry)
        self.values = []
        for value in initial:
            phi = b.phi(value.type)
            phi.add_incoming(value, entry)
            self.values.append(phi)
        b.cbranch(b.icmp_signed("<", self.index, n_iters), body, self.after)
        b.position_at_end(body)

    def close(self, new_values: list[ir.Value]) -> list[ir.Value]:
        b = self.b
        body_end = b.basic_block
        self.index.add_incoming(b.add(self.index, ir.Constant(_I64, 1)), body_end)
        for phi, new in zip(self.values, new_values):
            phi.add_incoming(new, body_end)
        b.branch(self.header)
        b.position_at_end(self.after)
        return self.values


class _Emitter:
    """Emits the block-product loop for one (quant type, ISA, rows x tokens tile) combination.

    ``rows`` weight rows are multiplied with ``toks`` activation vectors; each of the
    ``rows * toks`` pairs owns one <8 x float> accumulator. A weight block is loaded and
    unpacked once per tile and used for all tokens; an activation block once and used for all
    rows (the register blocking).
    """

    def __init__(self, builder: ir.IRBuilder, isa: str, qtype: str, gfni: bool | None = None):
        """gfni: whether the target has GFNI; None = what Numba compiles for (the host's kernels)."""
        self.b = builder
        self.isa = isa
        self.x86 = isa in X86_ISAS
        # arm64 sdot: s8 x s8, so both quant types keep their int8 operands as they are
        self.sdot = isa == "neon-dotprod"
        # GFNI (Ice Lake and later Intel, Zen 4 and later AMD) unpacks 4-bit weights in one instruction
        self.gfni = self.x86 and ("gfni" in _target_features() if gfni is None else gfni)
        self.qtype = qtype
        self.block_bytes = Q4_0_BLOCK_BYTES if qtype == "q4_0" else Q8_0_BLOCK_BYTES
        self.module = builder.module

    # ---- small helpers ----------------------------------------------------------------------

    def _llvm_fn(self, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
        return cgutils.get_or_insert_function(self.module, ir.FunctionType(ret, args), name)

    def _splat(self, scalar: ir.Value, vec_type: ir.VectorType) -> ir.Value:
        # insertelement into lane 0, then a shuffle with an all-zero mask copies it to all lanes
        one = self.b.insert_element(ir.Constant(vec_type, ir.Undefined), scalar, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(one, ir.Constant(vec_type, ir.Undefined), _mask([0] * vec_type.count))

    def _halve_add(self, vec: ir.Value) -> ir.Value:
        # lanes [0, n/2) + lanes [n/2, n): a reduction step that keeps the integer sum exact
        n = vec.type.count
        lo = self.b.shuffle_vector(vec, vec, _mask(range(n // 2)))
        hi = self.b.shuffle_vector(vec, vec, _mask(range(n // 2, n)))
        return self.b.add(lo, hi) if isinstance(vec.type.element, ir.IntType) else self.b.fadd(lo, hi)

    def _load(self, ptr_i8: ir.Value, ty: ir.Type) -> ir.Value:
        # ggml blocks are 18/34 bytes: nothing is aligned, every load says align 1
        return self.b.load(self.b.bitcast(ptr_i8, ty.as_pointer()), align=1)

    def _fp16_splat(self, ptr_i8: ir.Value) -> ir.Value:
        """<8 x float> with the fp16 at ptr_i8 (a block's d) in every lane."""
        bits = self._load(ptr_i8, _I16)
        if self.x86:
            # Splat the half first, then convert 8 lanes: vpbroadcastw + vcvtph2ps (F16C). Converting
            # a scalar half instead makes LLVM emit a vpinsrw that merges into whatever register
            # it picks, often an accumulator: a false dependency across blocks (~10% slower).
            halves = self._splat(self.b.bitcast(bits, _F16), ir.VectorType(_F16, _LANES))
            return self.b.fpext(halves, _V8F32)
        if self.sdot:
            # ARMv8.0 converts a half with one fcvt (no library call), then splat with dup
            return self._splat(self.b.fpext(self.b.bitcast(bits, _F16), _F32), _V8F32)
        # Portable: `fpext half` would become a compiler-rt call (__extendhfsf2) on x86 without
        # F16C, which Numba's JIT may not resolve: integer arithmetic instead.
        return self._splat(emit_f16_bits_to_f32(self.b, bits), _V8F32)

    # ---- per-block pieces ---------------------------------------------------------------------

    def weight_block(self, block_ptr: ir.Value) -> tuple[ir.Value, tuple[ir.Value, ...]]:
        """(fp32 scale in 8 lanes, operands for lane_dots) of the weight block at block_ptr."""
        scale = self._fp16_splat(block_ptr)
        payload = self.b.gep(block_ptr, [ir.Constant(_I64, 2)])
        if self.qtype == "q4_0":
            nibbles = self.nibbles(payload)
            if self.x86 or self.sdot:
                return scale, (nibbles,)  # u8 operand of pmaddubsw / vpdpbusd; 0..15 is also a valid s8 for sdot
            return scale, (self.b.zext(nibbles, _V32I16),)
        weights = self._load(payload, _V32I8)
        if self.sdot:
            return scale, (weights,)
        if self.x86:
            # pmaddubsw wants an unsigned operand: |w| as u8 (|-128| = 128 is still exact as u8),
            # the sign moves to the activations per token (psign in lane_dots)
            abs_fn = self._llvm_fn("llvm.abs.v32i8", _V32I8, [_V32I8, _I1])
            return scale, (self.b.call(abs_fn, [weights, ir.Constant(_I1, 0)]), weights)
        return scale, (self.b.sext(weights, _V32I16),)

    def nibbles(self, packed_ptr: ir.Value) -> ir.Value:
        """<32 x i8>: the 16 bytes at packed_ptr as ggml orders their nibbles (the low nibbles are
        elements 0..15, the high ones 16..31), each 0..15.

        On x86 the 16 bytes are loaded into both 128-bit halves at once (vbroadcasti128, a load
        without shuffle work); then one instruction per half: with GFNI a vgf2p8affineqb whose bit
        matrix is "keep bits 0-3" for the low half and "bits 4-7 down to 0-3" for the high half,
        else a vpsrlvq shifting the high half by 4 and one mask. The portable mask/shift/concatenate
        took three vector instructions more per block there: Q4_0 4096x4096 matrix-vector, 1 thread,
        AMD EPYC Zen 4: 18.3 -> 21.5 GB/s (GFNI), same bits."""
        b = self.b
        if not self.x86:
            packed = self._load(packed_ptr, _V16I8)
            low = b.and_(packed, _vconst(_V16I8, 0x0F))
            high = b.lshr(packed, _vconst(_V16I8, 4))
            return b.shuffle_vector(low, high, _mask(range(32)))
        v2i64, v4i64 = ir.VectorType(_I64, 2), ir.VectorType(_I64, 4)
        packed = self._load(packed_ptr, v2i64)
        both = b.shuffle_vector(packed, packed, _mask([0, 1, 0, 1]))
        if self.gfni:
            # Row i of a GF(2) 8x8 matrix (byte 7 - i of its qword) selects the input bits of output
            # bit i: output bit i <- input bit i (low half) or input bit i + 4 (high half), i < 4.
            keep_low = sum(1 << (8 * (7 - i) + i) for i in range(4))
            high_down = sum(1 << (8 * (7 - i) + i + 4) for i in range(4))
            matrices = ir.Constant(v4i64, [keep_low, keep_low, high_down, high_down])
            affine = self._llvm_fn("llvm.x86.vgf2p8affineqb.256", _V32I8, [_V32I8, _V32I8, _I8])
            return b.call(affine, [b.bitcast(both, _V32I8), b.bitcast(matrices, _V32I8), ir.Constant(_I8, 0)])
        shifted = b.lshr(both, ir.Constant(v4i64, [0, 0, 4, 4]))
        return b.and_(b.bitcast(shifted, _V32I8), _vconst(_V32I8, 0x0F))

    def token_block(self, x_ptr: ir.Value, scale_ptr: ir.Value, sum_ptr: ir.Value | None):
        """(activation operand, fp32 scale in 8 lanes, int32 block sum or None) of one activation block."""
        x = self._load(x_ptr, _V32I8)
        if not (self.x86 or self.sdot):
            x = self.b.sext(x, _V32I16)
        scale = self._splat(self.b.load(scale_ptr, align=4), _V8F32)  # a vbroadcastss from memory
        block_sum = self.b.load(sum_ptr, align=4) if sum_ptr is not None else None
        return x, scale, block_sum

    def lane_dots(self, w_ops: tuple[ir.Value, ...], x: ir.Value, block_sum: ir.Value | None) -> ir.Value:
        """<8 x i32> whose lane total is the exact integer block dot (Q4_0 offset included)."""
        b = self.b
        if self.sdot:
            return self._sdot_lanes(w_ops[0], x, block_sum)
        if self.isa.endswith("-vnni"):
            if self.qtype == "q4_0":
                u8, s8 = w_ops[0], x
            else:  # the same sign trick as below
                psign = self._llvm_fn("llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
                u8, s8 = w_ops[0], b.call(psign, [x, w_ops[1]])
            lanes = _dpbusd(b, _vconst(_V8I32, 0), u8, s8)
        elif self.x86:
            maddubs = self._llvm_fn("llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
            maddwd = self._llvm_fn("llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
            if self.qtype == "q4_0":
                # u8 nibble x s8 activation, adjacent pairs summed into i16: |pair| <= 2*15*128,
                # far from i16 saturation, so exact
                pairs = b.call(maddubs, [w_ops[0], x])
            else:
                # sign trick: |w| * (x * sign(w)) = w * x; psign zeroes x where w == 0.
                # Exact because activations are in [-127, 127] (never -128, whose negation
                # overflows) and |pair| <= 2 * 128 * 127 = 32512 < 32767 (no saturation).
                psign = self._llvm_fn("llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
                pairs = b.call(maddubs, [w_ops[0], b.call(psign, [x, w_ops[1]])])
            # pairs of i16 -> i32 (multiply by 1 and add adjacent): 8 lanes of 4 products each
            lanes = b.call(maddwd, [pairs, _vconst(_V16I16, 1)])
        elif self.qtype == "q4_0":
            # |nibble * x| <= 15 * 128 = 1920: the product and two halving adds (<= 4 products,
            # 7680) stay exact in i16; only then widen to the 8 x i32 lanes
            products = b.mul(w_ops[0], x)
            lanes = b.sext(self._halve_add(self._halve_add(products)), _V8I32)
        else:
            # |w * x| <= 128 * 128 = 16384 fits i16, but sums of two may not: widen before adding
            products = b.sext(b.mul(w_ops[0], x), ir.VectorType(_I32, 32))
            lanes = self._halve_add(self._halve_add(products))
        if block_sum is not None:
            # Q4_0 value is (nibble - 8): sum(nibble*x) - 8*sum(x); each of the 8 lanes takes off
            # one sum(x), so the lane total carries the whole offset (still exact in i32)
            lanes = b.sub(lanes, self._splat(block_sum, _V8I32))
        return lanes

    def _sdot_lanes(self, w: ir.Value, x: ir.Value, block_sum: ir.Value | None) -> ir.Value:
        """arm64 dot-product extension: two 128-bit sdot (lane i of each = the 4 products of bytes
        4i..4i+3), concatenated. These are the same <8 x i32> lanes as x86's vpdpbusd / pmaddubsw +
        pmaddwd for the same byte order, and the Q4_0 offset is taken off the same way (one
        sum(x) per lane, here as the sdot accumulator's start value), so every lane, and with the
        shared float code every result, is bit-identical to the x86 kernels'."""
        b = self.b
        v4i32 = ir.VectorType(_I32, 4)
        sdot = self._llvm_fn("llvm.aarch64.neon.sdot.v4i32.v16i8", v4i32, [v4i32, _V16I8, _V16I8])
        start = _vconst(v4i32, 0) if block_sum is None else self._splat(b.neg(block_sum), v4i32)
        halves = []
        for half in (range(16), range(16, 32)):
            w_half = b.shuffle_vector(w, w, _mask(half))
            x_half = b.shuffle_vector(x, x, _mask(half))
            halves.append(b.call(sdot, [start, w_half, x_half]))
        return b.shuffle_vector(halves[0], halves[1], _mask(range(8)))

    def accumulate(self, acc: ir.Value, lanes: ir.Value, scale_vec: ir.Value) -> ir.Value:
        """acc + float(lanes) * scale_vec, lane-wise (one FMA on AVX2)."""
        # |lane| < 2**24, so the int -> float conversion is exact
        as_float = self.b.sitofp(lanes, _V8F32)
        if self.x86 or self.sdot:  # both always have a fused multiply-add (arm64: fmla)
            fma = self._llvm_fn("llvm.fma.v8f32", _V8F32, [_V8F32] * 3)
        else:
            # fmuladd: fused where the target has FMA, mul + add elsewhere (never a libm call)
            fma = self._llvm_fn("llvm.fmuladd.v8f32", _V8F32, [_V8F32] * 3)
        return self.b.call(fma, [as_float, scale_vec, acc])

    def horizontal_sum(self, acc: ir.Value) -> ir.Value:
        # fixed tree (8 -> 4 -> 2 -> 1), so results do not depend on anything but the inputs
        v4 = self._halve_add(acc)
        v2 = self._halve_add(v4)
        return self.b.fadd(
            self.b.extract_element(v2, ir.Constant(_I32, 0)), self.b.extract_element(v2, ir.Constant(_I32, 1))
        )

    # ---- the loop ---------------------------------------------------------------------------------

    def block_step(self, block: ir.Value, w_rows, tokens, accs: list[ir.Value]) -> list[ir.Value]:
        """Process block index `block` for every (row, token) pair; accs is row-major."""
        b = self.b
        weights = []
        for row_ptr in w_rows:
            block_ptr = b.gep(row_ptr, [b.mul(block, ir.Constant(_I64, self.block_bytes))])
            emit_prefetch(b, block_ptr, _PREFETCH_BYTES)
            weights.append(self.weight_block(block_ptr))
        acts = []
        for x_ptr, scale_ptr, sum_ptr in tokens:
            acts.append(
                self.token_block(
                    b.gep(x_ptr, [b.mul(block, ir.Constant(_I64, QK))]),
                    b.gep(scale_ptr, [block]),
                    b.gep(sum_ptr, [block]) if sum_ptr is not None else None,
                )
            )
        out = []
        for r, (w_scale, w_ops) in enumerate(weights):
            for t, (x, x_scale, x_sum) in enumerate(acts):
                lanes = self.lane_dots(w_ops, x, x_sum)
                out.append(self.accumulate(accs[r * len(acts) + t], lanes, b.fmul(w_scale, x_scale)))
        return out

    def tile(self, w_rows, tokens, n_blocks: ir.Value) -> list[ir.Value]:
        """Emit the whole loop over blocks; returns the rows x tokens float32 dots (row-major).

        w_rows: i8* per weight row; tokens: (i8* int8 values, float* scales, i32* sums or None).
        Tiles with fewer than 4 (row, token) pairs are unrolled by two blocks into two accumulator
        sets: the FMA latency (4 cycles on Zen 3) would otherwise bound a lone chain at ~4 cycles
        per block (~13 GB/s), and LLVM does not reassociate float chains by itself.
        """
        b = self.b
        n_pairs = len(w_rows) * len(tokens)
        unroll = 2 if n_pairs < 4 else 1
        fn = b.function
        n_iters = b.lshr(n_blocks, ir.Constant(_I64, 1)) if unroll == 2 else n_blocks
        loop = _Loop(b, n_iters, [_vconst(_V8F32, 0.0)] * (unroll * n_pairs), "qdot")
        accs, new_accs = loop.values, []
        for u in range(unroll):
            block = b.add(b.mul(loop.index, ir.Constant(_I64, unroll)), ir.Constant(_I64, u))
            new_accs += self.block_step(block, w_rows, tokens, accs[u * n_pairs : (u + 1) * n_pairs])
        loop.close(new_accs)
        after = loop.after
        if unroll == 1:
            finals = accs
        else:
            # odd block count: the last block goes into accumulator set 0
            tail = fn.append_basic_block("qdot.tail")
            done = fn.append_basic_block("qdot.done")
            is_odd = b.trunc(b.and_(n_blocks, ir.Constant(_I64, 1)), _I1)
            b.cbranch(is_odd, tail, done)
            b.position_at_end(tail)
            tail_accs = self.block_step(b.sub(n_blocks, ir.Constant(_I64, 1)), w_rows, tokens, accs[:n_pairs])
            tail_end = b.basic_block
            b.branch(done)
            b.position_at_end(done)
            merged = []
            for k in range(n_pairs):  # all phis first: LLVM requires them at the top of the block
                phi = b.phi(_V8F32)
                phi.add_incoming(accs[k], after)
                phi.add_incoming(tail_accs[k], tail_end)
                merged.append(phi)
            finals = [b.fadd(merged[k], accs[n_pairs + k]) for k in range(n_pairs)]
        return [self.horizontal_sum(acc) for acc in finals]


def _dpbusd(builder: ir.IRBuilder, acc: ir.Value, u8: ir.Value, s8: ir.Value) -> ir.Value:
    """acc (<8 x i32>) + per lane the sum of 4 products u8 x s8 (AVX-VNNI vpdpbusd). Exact in
    i32: no 16-bit intermediate, so the same integers as pmaddubsw + pmaddwd where those do not
    saturate (the kernels' bounds guarantee they do not)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V8I32, [_V8I32] * 3), "llvm.x86.avx512.vpdpbusd.256")
    return builder.call(fn, [acc, builder.bitcast(u8, _V8I32), builder.bitcast(s8, _V8I32)])


def _x8_wide_groups(b: ir.IRBuilder, qtype: str, block_w: ir.Value, x_block: list, sums: list) -> None:
    """AVX-512 VNNI body of an x8 block: groups g and g+1 (64 contiguous packed bytes: 8 rows x 4
    weights each) against the token's 8 activations 4g..4g+7 (bytes 0-3 broadcast to the low 256
    bits, 4-7 to the high 256 bits), one 512-bit vpdpbusd; the two halves are added at the end, so
    ``sums[t]`` ends as the same <8 x i32> exact integers as the 256-bit kernels'."""
    v64i8 = ir.VectorType(_I8, 64)
    v16i32 = ir.VectorType(_I32, 16)
    dpbusd = cgutils.get_or_insert_function(
        b.module, ir.FunctionType(v16i32, [v16i32] * 3), "llvm.x86.avx512.vpdpbusd.512")
    vabs = cgutils.get_or_insert_function(b.module, ir.FunctionType(v64i8, [v64i8, _I1]), "llvm.abs.v64i8")
    zero8 = ir.Constant(v64i8, [0] * 64)
    acc = [ir.Constant(v16i32, [0] * 16)] * len(x_block)
    for g in range(0, QK // _X8_GROUP, 2):
        w = b.load(b.bitcast(b.gep(block_w, [ir.Constant(_I64, g * 32)]), v64i8.as_pointer()), align=1)
        w_abs = b.call(vabs, [w, ir.Constant(_I1, 0)]) if qtype == "q8_0" else w
        for t, x_ptr in enumerate(x_block):
            eight = b.load(b.bitcast(b.gep(x_ptr, [ir.Constant(_I64, g * _X8_GROUP)]),
                                     ir.VectorType(_I32, 2).as_pointer()), align=1)
            x = b.bitcast(b.shuffle_vector(eight, eight, _mask([0] * 8 + [1] * 8)), v64i8)
            if qtype == "q8_0":
                # psign has no 512-bit form: x where w > 0, -x where w < 0, 0 where w == 0
                # (exact: activations are in [-127, 127])
                x = b.select(b.icmp_signed("<", w, zero8), b.sub(zero8, x), x)
                x = b.select(b.icmp_signed("==", w, zero8), zero8, x)
            acc[t] = b.call(dpbusd, [acc[t], b.bitcast(w_abs, v16i32), b.bitcast(x, v16i32)])
    for t in range(len(x_block)):
        low = b.shuffle_vector(acc[t], acc[t], _mask(range(8)))
        high = b.shuffle_vector(acc[t], acc[t], _mask(range(8, 16)))
        sums[t] = b.add(low, high)


def _as_i8_ptr(builder: ir.IRBuilder, ptr: ir.Value) -> ir.Value:
    return builder.bitcast(ptr, _I8.as_pointer())


def _row_ptr(builder: ir.IRBuilder, ary, index: ir.Value, elem_type: ir.Type) -> ir.Value:
    """Pointer to row `index` of a C-contiguous 2D array (rows are strides[0] bytes apart)."""
    stride = builder.extract_value(ary.strides, 0)
    ptr = builder.gep(_as_i8_ptr(builder, ary.data), [builder.mul(index, stride)])
    return builder.bitcast(ptr, elem_type.as_pointer())


def _umin(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    return builder.select(builder.icmp_unsigned("<", a, b), a, b)


def _safe_block_count(builder, w, xq, xs, xsum, block_bytes: int, last_dim: int) -> ir.Value:
    """Blocks that are present in every operand: a shape mismatch can never read out of bounds."""
    n = builder.udiv(builder.extract_value(w.shape, last_dim), ir.Constant(_I64, block_bytes))
    n = _umin(builder, n, builder.udiv(builder.extract_value(xq.shape, last_dim), ir.Constant(_I64, QK)))
    n = _umin(builder, n, builder.extract_value(xs.shape, last_dim))
    if xsum is not None:
        n = _umin(builder, n, builder.extract_value(xsum.shape, last_dim))
    return n


def _check_array(ty, ndim: int, dtype, what: str) -> None:
    if not (isinstance(ty, types.Array) and ty.ndim == ndim and ty.dtype == dtype and ty.layout == "C"):
        raise TypeError(f"{what}: expected a C-contiguous {ndim}-d {dtype} array, got {ty}")


# --------------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------------


def _make_row_dot(qtype: str, isa_mode: str):
    """Intrinsic `(w_row, xq, xscales[, xsums]) -> float32` over 1-D C-contiguous arrays."""
    has_sums = qtype == "q4_0"
    block_bytes = Q4_0_BLOCK_BYTES if has_sums else Q8_0_BLOCK_BYTES

    def codegen(context, builder, sig, args):
        isa = kernel_isa() if isa_mode == "host" else "generic"
        arrays = [context.make_array(ty)(context, builder, val) for ty, val in zip(sig.args, args)]
        w, xq, xs = arrays[:3]
        xsum = arrays[3] if has_sums else None
        n_blocks = _safe_block_count(builder, w, xq, xs, xsum, block_bytes, 0)
        token = (_as_i8_ptr(builder, xq.data), xs.data, xsum.data if has_sums else None)
        [dot] = _Emitter(builder, isa, qtype).tile([_as_i8_ptr(builder, w.data)], [token], n_blocks)
        return dot

    def check(w_row, xq, xscales, xsums=None):
        _check_array(w_row, 1, types.uint8, "w_row")
        _check_array(xq, 1, types.int8, "xq")
        _check_array(xscales, 1, types.float32, "xscales")
        if xsums is not None:
            _check_array(xsums, 1, types.int32, "xsums")

    if has_sums:

        def typer(typingctx, w_row, xq, xscales, xsums):
            check(w_row, xq, xscales, xsums)
            return types.float32(w_row, xq, xscales, xsums), codegen
    else:

        def typer(typingctx, w_row, xq, xscales):
            check(w_row, xq, xscales)
            return types.float32(w_row, xq, xscales), codegen

    typer.__name__ = typer.__qualname__ = f"{qtype}_row_dot_{isa_mode}"
    return intrinsic(typer)


def _make_tile(qtype: str, isa_mode: str, n_rows: int, n_tok: int):
    """Intrinsic `(w, row0, xq, xscales[, xsums], tok0) -> UniTuple(float32, n_rows * n_tok)`.

    Rows row0..row0+n_rows-1 of the 2-D weights times activation rows tok0..tok0+n_tok-1 of the
    2-D activations; results row-major (row r, token t at r * n_tok + t). The caller guarantees
    the row and token ranges are in bounds.
    """
    has_sums = qtype == "q4_0"
    block_bytes = Q4_0_BLOCK_BYTES if has_sums else Q8_0_BLOCK_BYTES
    ret = types.UniTuple(types.float32, n_rows * n_tok)

    def codegen(context, builder, sig, args):
        isa = kernel_isa() if isa_mode == "host" else "generic"
        w = context.make_array(sig.args[0])(context, builder, args[0])
        row0 = args[1]
        xq = context.make_array(sig.args[2])(context, builder, args[2])
        xs = context.make_array(sig.args[3])(context, builder, args[3])
        xsum = context.make_array(sig.args[4])(context, builder, args[4]) if has_sums else None
        tok0 = args[-1]
        n_blocks = _safe_block_count(builder, w, xq, xs, xsum, block_bytes, 1)
        rows = [_row_ptr(builder, w, builder.add(row0, ir.Constant(_I64, r)), _I8) for r in range(n_rows)]
        tokens = []
        for t in range(n_tok):
            tok = builder.add(tok0, ir.Constant(_I64, t))
            tokens.append(
                (
                    _row_ptr(builder, xq, tok, _I8),
                    _row_ptr(builder, xs, tok, _F32),
                    _row_ptr(builder, xsum, tok, _I32) if has_sums else None,
                )
            )
        dots = _Emitter(builder, isa, qtype).tile(rows, tokens, n_blocks)
        return context.make_tuple(builder, ret, dots)

    def check(w, xq, xscales, xsums=None):
        _check_array(w, 2, types.uint8, "w")
        _check_array(xq, 2, types.int8, "xq")
        _check_array(xscales, 2, types.float32, "xscales")
        if xsums is not None:
            _check_array(xsums, 2, types.int32, "xsums")

    if has_sums:

        def typer(typingctx, w, row0, xq, xscales, xsums, tok0):
            check(w, xq, xscales, xsums)
            return ret(w, types.intp, xq, xscales, xsums, types.intp), codegen
    else:

        def typer(typingctx, w, row0, xq, xscales, tok0):
            check(w, xq, xscales)
            return ret(w, types.intp, xq, xscales, types.intp), codegen

    typer.__name__ = typer.__qualname__ = f"{qtype}_tile_{n_rows}x{n_tok}_{isa_mode}"
    return intrinsic(typer)


# Public row dots, callable from any @njit code. All arrays 1-D C-contiguous, activations as
# quantize_activations_q8_0 returns them (int8 in [-127, 127]: the AVX2 Q8_0 sign trick is wrong
# for -128). Blocks beyond the shortest operand are ignored, never read.
#: q4_0_row_dot(w_row: uint8[n/32*18], xq: int8[n], xscales: float32[n/32], xsums: int32[n/32]) -> float32
q4_0_row_dot = _make_row_dot("q4_0", "host")
q4_0_row_dot_generic = _make_row_dot("q4_0", "generic")
#: q8_0_row_dot(w_row: uint8[n/32*34], xq: int8[n], xscales: float32[n/32]) -> float32
q8_0_row_dot = _make_row_dot("q8_0", "host")
q8_0_row_dot_generic = _make_row_dot("q8_0", "generic")

# Register-blocked tiles for the batched drivers: 1 row x 4 tokens. Measured (4096x4096, 32 tokens,
# 1 thread, tokens/s, one interleaved run on a loaded box): 1x1 663, 1x2 794, 2x2 788, 1x4 883,
# 2x4 852, 1x8 906; 1x4 is within noise of the best and keeps register pressure low for the
# portable IR (16 ymm / 32 NEON registers).
_TILE_TOKENS = 4
# Rows per parallel work item of the batched drivers: 16 rows of 4096 Q4_0 weights are 37 KB (L2),
# and each 4-token activation tile is reused for all of them from L1 instead of being re-read from
# L2/L3 per row (128 tokens x 4096 activations = 512 KB). Measured +4-7% at 128 tokens, 1 thread.
_ROW_CHUNK = 16
_q4_0_tile_1x4 = _make_tile("q4_0", "host", 1, _TILE_TOKENS)
_q4_0_tile_1x4_generic = _make_tile("q4_0", "generic", 1, _TILE_TOKENS)
_q8_0_tile_1x4 = _make_tile("q8_0", "host", 1, _TILE_TOKENS)
_q8_0_tile_1x4_generic = _make_tile("q8_0", "generic", 1, _TILE_TOKENS)


# --------------------------------------------------------------------------------------------
# Activation quantization (ggml quantize_row_q8_0_ref, bit for bit)
# --------------------------------------------------------------------------------------------


@intrinsic
def _fp16_value(typingctx, d):
    """The float32 value of float16(d) for a float32 d (IEEE round to nearest even, overflow to inf),
    as ggml stores d: one vcvtps2ph + vcvtph2ps with F16C (fcvt on arm64). The frexp/ldexp form
    this replaced cost ~50 ns per 32-value block, most of a batch's activation quantization."""
    if d != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], _F16), _F32)

    return types.float32(d), codegen


# nnan/nsz only let LLVM vectorize the max reduction (inputs are finite; a maximum is exact in
# any order); every other operation is exact or done in the written order.
@njit(cache=True, fastmath={"nnan", "nsz"})
def _quantize_rows_q8_0(x, qs, scales, sums) -> None:
    # Written so LLVM vectorizes both loops (the branchy int() form ran at ~2.6 ns per value, 11%
    # of a 512-token prompt): roundf as floor + a compare. One function for a token and a batch,
    # with no jitted helper for a row: a batch wrapper and a row helper compiled in 0.98 s on a
    # model's first run (a helper is compiled, then linked into its caller and optimized again).
    # Not parallel: a 128 x 4096 batch takes 1 ms on one thread, about 1% of the matrix product it
    # feeds, while the parallel version cost 0.8 s more of first-run compile time.
    n_blocks = x.shape[1] // QK
    for t in range(x.shape[0]):
        for blk in range(n_blocks):
            base = blk * QK
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(np.float32(x[t, base + j])))
            # float32 arithmetic throughout, as ggml: d = amax / 127, id = 1 / d (from the float32 d,
            # not from its fp16 rounding)
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            total = np.int32(0)
            for j in range(QK):
                v = np.float32(x[t, base + j]) * inv
                # roundf: half away from zero (ggml), not numpy's half-to-even; |v| <= 127, so floor
                # and the subtraction are exact
                a = abs(v)
                whole = np.floor(a)
                if a - whole >= np.float32(0.5):
                    whole += np.float32(1.0)
                q = np.int32(-whole if v < np.float32(0.0) else whole)
                qs[t, base + j] = q
                total += q
            scales[t, blk] = _fp16_value(d)
            sums[t, blk] = total


def quantize_activations_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a float vector (n a multiple of 32) exactly like ggml / gguf Q8_0.

    Returns (qs int8[n], scales float32[n/32], block_sums int32[n/32]): qs in [-127, 127] are
    gguf's int8 values, scales[b] is the float32 value of the fp16 d gguf stores, block_sums[b] is
    the sum of qs over block b. Inputs are converted to float32 first; they must be finite.
    """
    qs, scales, sums = quantize_activations_q8_0_batch(np.asarray(x).reshape(1, -1))
    return qs[0], scales[0], sums[0]


def quantize_activations_q8_0_batch(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise :func:`quantize_activations_q8_0` of x[n_tok, n]: int8[n_tok, n], float32 and
    int32 [n_tok, n/32]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tok, n = x.shape
    if n % QK != 0:
        raise ValueError(f"Q8_0 activations: row length {n} is not a multiple of {QK}")
    qs = np.empty((n_tok, n), np.int8)
    scales = np.empty((n_tok, n // QK), np.float32)
    sums = np.empty((n_tok, n // QK), np.int32)
    _quantize_rows_q8_0(x, qs, scales, sums)
    return qs, scales, sums


# --------------------------------------------------------------------------------------------
# Scalar reference (plain Numba): the exact integer block dots the fast paths must reproduce
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _fp16_bits_to_f32(lo: int, hi: int) -> np.float32:
    bits = int(lo) | (int(hi) << 8)
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:
        value = mantissa * 2.0**-24
    elif exponent == 31:
        value = np.inf if mantissa == 0 else np.nan
    else:
        value = (1024 + mantissa) * 2.0 ** (exponent - 25)
    return np.float32(-value if bits & 0x8000 else value)


@njit(cache=True)
def q4_0_block_dots_ref(w_row: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """int32[n/32]: per block sum_j (nibble_j - 8) * xq_j, straight from the ggml layout."""
    n_blocks = xq.shape[0] // QK
    out = np.empty(n_blocks, np.int32)
    for blk in range(n_blocks):
        base = blk * Q4_0_BLOCK_BYTES + 2
        total = 0
        for j in range(16):
            byte = int(w_row[base + j])
            total += ((byte & 0x0F) - 8) * int(xq[blk * QK + j])
            total += ((byte >> 4) - 8) * int(xq[blk * QK + j + 16])
        out[blk] = total
    return out


@njit(cache=True)
def q8_0_block_dots_ref(w_row: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """int32[n/32]: per block sum_j w_j * xq_j."""
    n_blocks = xq.shape[0] // QK
    out = np.empty(n_blocks, np.int32)
    for blk in range(n_blocks):
        base = blk * Q8_0_BLOCK_BYTES + 2
        total = 0
        for j in range(QK):
            total += int(np.int8(w_row[base + j])) * int(xq[blk * QK + j])
        out[blk] = total
    return out


@njit(cache=True)
def _scaled_sum_ref(w_row, xscales, dots, block_bytes: int) -> np.float32:
    acc = np.float32(0.0)
    for blk in range(dots.shape[0]):
        w_scale = _fp16_bits_to_f32(w_row[blk * block_bytes], w_row[blk * block_bytes + 1])
        acc += np.float32(dots[blk]) * (w_scale * xscales[blk])
    return acc


@njit(cache=True)
def q4_0_row_dot_ref(w_row: np.ndarray, xq: np.ndarray, xscales: np.ndarray) -> np.float32:
    """sum_b float32(idot_b) * (d_w,b * d_x,b), blocks in order, float32 (no FMA)."""
    return _scaled_sum_ref(w_row, xscales, q4_0_block_dots_ref(w_row, xq), Q4_0_BLOCK_BYTES)


@njit(cache=True)
def q8_0_row_dot_ref(w_row: np.ndarray, xq: np.ndarray, xscales: np.ndarray) -> np.float32:
    return _scaled_sum_ref(w_row, xscales, q8_0_block_dots_ref(w_row, xq), Q8_0_BLOCK_BYTES)


@njit(cache=True)
def matvec_q4_0_ref(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    for row in range(w_raw.shape[0]):
        out[row] = q4_0_row_dot_ref(w_raw[row], xq, xscales)


@njit(cache=True)
def matvec_q8_0_ref(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    for row in range(w_raw.shape[0]):
        out[row] = q8_0_row_dot_ref(w_raw[row], xq, xscales)


def row_dot_error_bound(qtype: str, w_row: np.ndarray, xq: np.ndarray, xscales: np.ndarray) -> float:
    """Bound on |fast - reference| for one row dot (qtype "q4_0" or "q8_0"); numpy, for tests.

    Both paths compute S = sum_b idot_b * s_b with the same float32 s_b = fp32(d_w,b * d_x,b) and
    the exact integer idot_b; they differ only in float summation order. The fast path adds
    float(lane) * s_b into 8 lanes (one rounding per block with FMA, two with mul + add), merges
    two accumulator sets and sums 8 lanes by a tree: each term sees at most n_blocks + 5
    roundings, so |fast - S| <= gamma(n_blocks + 5) * sum_b |s_b| * L_b, where L_b bounds the sum
    of |lane| over any split of the block into 8 lanes: sum_j nibble_j |x_j| + 8 |sum_j x_j| for
    Q4_0 (each lane takes off one block sum), sum_j |w_j x_j| for Q8_0. The reference adds in
    block order: |ref - S| <= gamma(n_blocks + 1) * sum_b |s_b idot_b|.
    gamma(k) = k u / (1 - k u), u = 2**-24 (relative rounding; assumes no float32 underflow).
    """
    block_bytes = Q4_0_BLOCK_BYTES if qtype == "q4_0" else Q8_0_BLOCK_BYTES
    n_blocks = len(xscales)
    blocks = np.asarray(w_row, np.uint8).reshape(n_blocks, block_bytes)
    x = np.asarray(xq, np.int64).reshape(n_blocks, QK)
    w_scale = blocks[:, :2].copy().view(np.float16).astype(np.float32).ravel()
    s = np.abs((w_scale * np.asarray(xscales, np.float32)).astype(np.float64))
    if qtype == "q4_0":
        packed = blocks[:, 2:].astype(np.int64)
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1)
        lane_total = (nibbles * np.abs(x)).sum(axis=1) + 8 * np.abs(x.sum(axis=1))
        idot = ((nibbles - 8) * x).sum(axis=1)
    else:
        w = blocks[:, 2:].view(np.int8).astype(np.int64)
        lane_total = np.abs(w * x).sum(axis=1)
        idot = (w * x).sum(axis=1)
    u = 2.0**-24

    def gamma(k: int) -> float:
        return k * u / (1 - k * u)

    return gamma(n_blocks + 5) * float(np.sum(s * lane_total)) + gamma(n_blocks + 1) * float(np.sum(s * np.abs(idot)))


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _check_shapes(w_raw, xq, xscales, out_len: int, block_bytes: int) -> None:
    n_in = xq.shape[-1]
    if n_in % QK != 0 or xscales.shape[-1] != n_in // QK:
        raise ValueError("activations: need n_in % 32 == 0 and n_in / 32 scales")
    if w_raw.shape[1] != (n_in // QK) * block_bytes:
        raise ValueError("weights: row bytes do not match the activation length")
    if out_len != w_raw.shape[0]:
        raise ValueError("out: length must be the number of weight rows")


# Each driver exists twice, host ISA and portable IR, rather than taking a flag: a runtime flag
# would compile both IR flavours into every specialization, and the default-vs-explicit flag
# would make two specializations of each (compile time is 2-4 s per driver on the dev box).


@njit(parallel=True, cache=True)
def matvec_q4_0(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, xsums: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(Q4_0 row r of w_raw[n_out, n_in/32*18], activations); rows split over threads.

    One whole-row intrinsic call per row (measured faster than 2-row tiles: the single-row loop
    is unrolled by two blocks and needs no second weight stream).
    """
    _check_shapes(w_raw, xq, xscales, out.shape[0], Q4_0_BLOCK_BYTES)
    if xsums.shape[0] != xscales.shape[0]:
        raise ValueError("xsums: need n_in / 32 block sums")
    for r in prange(w_raw.shape[0]):
        out[r] = q4_0_row_dot(w_raw[r], xq, xscales, xsums)


@njit(parallel=True, cache=True)
def matvec_q4_0_generic(
    w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, xsums: np.ndarray, out: np.ndarray
) -> None:
    """matvec_q4_0 with the portable IR."""
    _check_shapes(w_raw, xq, xscales, out.shape[0], Q4_0_BLOCK_BYTES)
    if xsums.shape[0] != xscales.shape[0]:
        raise ValueError("xsums: need n_in / 32 block sums")
    for r in prange(w_raw.shape[0]):
        out[r] = q4_0_row_dot_generic(w_raw[r], xq, xscales, xsums)


@njit(parallel=True, cache=True)
def matvec_q8_0(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(Q8_0 row r of w_raw[n_out, n_in/32*34], activations); rows split over threads."""
    _check_shapes(w_raw, xq, xscales, out.shape[0], Q8_0_BLOCK_BYTES)
    for r in prange(w_raw.shape[0]):
        out[r] = q8_0_row_dot(w_raw[r], xq, xscales)


@njit(parallel=True, cache=True)
def matvec_q8_0_generic(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """matvec_q8_0 with the portable IR."""
    _check_shapes(w_raw, xq, xscales, out.shape[0], Q8_0_BLOCK_BYTES)
    for r in prange(w_raw.shape[0]):
        out[r] = q8_0_row_dot_generic(w_raw[r], xq, xscales)


@njit(parallel=True, cache=True)
def matmul_q4_0(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, xsums: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = dot(Q4_0 row r, activation row t) for xq[n_tok, n_in] quantized once.

    Chunks of 16 rows are the outer (parallel) loop and each chunk meets all tokens while it is in
    L2, so the weights are read from memory once per batch; tokens go 4 at a time (1 row x 4
    tokens tile: the row's blocks are unpacked once for 4 tokens, and the 4 tokens' activations
    stay in L1 across the chunk's rows), the remainder one at a time.
    """
    _check_shapes(w_raw, xq, xscales, out.shape[1], Q4_0_BLOCK_BYTES)
    if xsums.shape != xscales.shape or out.shape[0] != xq.shape[0]:
        raise ValueError("xsums / out: shapes do not match the activations")
    n_tok = xq.shape[0]
    n_tiled = n_tok - n_tok % _TILE_TOKENS
    n_chunks = (w_raw.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK
    for chunk in prange(n_chunks):
        first = chunk * _ROW_CHUNK
        last = min(first + _ROW_CHUNK, w_raw.shape[0])
        for t in range(0, n_tiled, _TILE_TOKENS):
            for r in range(first, last):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _q4_0_tile_1x4(w_raw, r, xq, xscales, xsums, t)
        for t in range(n_tiled, n_tok):
            for r in range(first, last):
                out[t, r] = q4_0_row_dot(w_raw[r], xq[t], xscales[t], xsums[t])


@njit(parallel=True, cache=True)
def matmul_q4_0_generic(
    w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, xsums: np.ndarray, out: np.ndarray
) -> None:
    """matmul_q4_0 with the portable IR."""
    _check_shapes(w_raw, xq, xscales, out.shape[1], Q4_0_BLOCK_BYTES)
    if xsums.shape != xscales.shape or out.shape[0] != xq.shape[0]:
        raise ValueError("xsums / out: shapes do not match the activations")
    n_tok = xq.shape[0]
    n_tiled = n_tok - n_tok % _TILE_TOKENS
    n_chunks = (w_raw.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK
    for chunk in prange(n_chunks):
        first = chunk * _ROW_CHUNK
        last = min(first + _ROW_CHUNK, w_raw.shape[0])
        for t in range(0, n_tiled, _TILE_TOKENS):
            for r in range(first, last):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _q4_0_tile_1x4_generic(
                    w_raw, r, xq, xscales, xsums, t
                )
        for t in range(n_tiled, n_tok):
            for r in range(first, last):
                out[t, r] = q4_0_row_dot_generic(w_raw[r], xq[t], xscales[t], xsums[t])


@njit(parallel=True, cache=True)
def matmul_q8_0(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = dot(Q8_0 row r, activation row t) for xq[n_tok, n_in]; see matmul_q4_0."""
    _check_shapes(w_raw, xq, xscales, out.shape[1], Q8_0_BLOCK_BYTES)
    if out.shape[0] != xq.shape[0]:
        raise ValueError("out: shape does not match the activations")
    n_tok = xq.shape[0]
    n_tiled = n_tok - n_tok % _TILE_TOKENS
    n_chunks = (w_raw.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK
    for chunk in prange(n_chunks):
        first = chunk * _ROW_CHUNK
        last = min(first + _ROW_CHUNK, w_raw.shape[0])
        for t in range(0, n_tiled, _TILE_TOKENS):
            for r in range(first, last):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _q8_0_tile_1x4(w_raw, r, xq, xscales, t)
        for t in range(n_tiled, n_tok):
            for r in range(first, last):
                out[t, r] = q8_0_row_dot(w_raw[r], xq[t], xscales[t])


@njit(parallel=True, cache=True)
def matmul_q8_0_generic(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """matmul_q8_0 with the portable IR."""
    _check_shapes(w_raw, xq, xscales, out.shape[1], Q8_0_BLOCK_BYTES)
    if out.shape[0] != xq.shape[0]:
        raise ValueError("out: shape does not match the activations")
    n_tok = xq.shape[0]
    n_tiled = n_tok - n_tok % _TILE_TOKENS
    n_chunks = (w_raw.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK
    for chunk in prange(n_chunks):
        first = chunk * _ROW_CHUNK
        last = min(first + _ROW_CHUNK, w_raw.shape[0])
        for t in range(0, n_tiled, _TILE_TOKENS):
            for r in range(first, last):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _q8_0_tile_1x4_generic(
                    w_raw, r, xq, xscales, t
                )
        for t in range(n_tiled, n_tok):
            for r in range(first, last):
                out[t, r] = q8_0_row_dot_generic(w_raw[r], xq[t], xscales[t])


# --------------------------------------------------------------------------------------------
# Prompt processing, AVX2: 8 rows interleaved, repacked on the fly
# --------------------------------------------------------------------------------------------
#
# The row-major tiles above spend ~10 instructions per 32 multiply-adds: every (row, token,
# block) needs its own int -> float conversion, scale product and FMA, and rows end in a
# horizontal sum. ggml's answer (its Q4_0 "8x8" repacking) is to interleave 8 rows so that one
# 32-byte vector holds 4 consecutive weights of each of 8 rows: pmaddubsw against the 4
# activations broadcast to every lane, then pmaddwd, leaves each 32-bit lane with one row's
# partial dot. A block's 8 groups are summed in 16-bit lanes (|lane| <= 8 * 2 * 15 * 127 =
# 30480 < 32767: exact), converted once, and scaled with the 8 rows' scales in one FMA per
# (token, block); the 8 results per token are a single vector store. About 4 instructions per
# 32 multiply-adds.
#
# The weights are not repacked in the file or at load time (which would cost a copy of the
# model): each parallel work item repacks its 8 rows into a small buffer (nibbles unpacked to
# bytes: 288 bytes per block of 8 rows, 36-99 KB for 4096-11008 inputs, in L2) and then runs
# every token over it, so the repacking is amortized over the batch.

_X8_ROWS = 8
_X8_GROUP = 4  # weights per row in one 32-byte group
_X8_BLOCK_BYTES = _X8_ROWS * QK  # 256 unpacked nibbles per block of 8 rows


@intrinsic
def _f16_bits_as_f32(typingctx, lo, hi):
    """float32 value of the IEEE half with bytes (lo, hi): one vcvtph2ps with F16C (the x8 path is
    AVX2-only, and AVX2 machines have F16C: kernel_isa() checks both)."""

    def codegen(context, builder, signature, args):
        low = builder.zext(builder.trunc(args[0], _I8) if args[0].type != _I8 else args[0], _I16)
        high = builder.zext(builder.trunc(args[1], _I8) if args[1].type != _I8 else args[1], _I16)
        bits = builder.or_(low, builder.shl(high, ir.Constant(_I16, 8)))
        return builder.fpext(builder.bitcast(bits, _F16), _F32)

    return types.float32(lo, hi), codegen


@njit(cache=True)
def repack_q4_0_x8(w_raw: np.ndarray, row0: int, packed: np.ndarray, scales: np.ndarray) -> None:
    """Rows row0..row0+7 of Q4_0 weights -> ``packed`` uint8[n_blocks * 256], ``scales`` float32[n_blocks * 8].

    Block b, group g (elements 4g..4g+3), row r, element e lands at
    ``packed[b * 256 + g * 32 + r * 4 + e % 4]`` as the unsigned nibble (0..15); ``scales[b * 8 + r]``
    is the row's block scale.
    """
    n_blocks = w_raw.shape[1] // Q4_0_BLOCK_BYTES
    words = packed.view(np.uint32)  # group g of block b, row r = word b * 64 + g * 8 + r
    for r in range(_X8_ROWS):
        row = w_raw[row0 + r]
        for blk in range(n_blocks):
            base = blk * Q4_0_BLOCK_BYTES
            scales[blk * _X8_ROWS + r] = _f16_bits_as_f32(row[base], row[base + 1])
            out = blk * (_X8_BLOCK_BYTES // 4) + r
            for k in range(4):
                o = base + 2 + 4 * k
                word = (np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8))
                        | (np.uint32(row[o + 2]) << np.uint32(16)) | (np.uint32(row[o + 3]) << np.uint32(24)))
                # bytes 4k..4k+3: low nibbles are elements 4k.. (group k), high nibbles 16+4k.. (group 4+k)
                words[out + k * _X8_ROWS] = word & np.uint32(0x0F0F0F0F)
                words[out + (k + 4) * _X8_ROWS] = (word >> np.uint32(4)) & np.uint32(0x0F0F0F0F)


def _make_x8_tile(n_tok: int, qtype: str = "q4_0"):
    """AVX2 intrinsic ``(packed, scales, xq, xscales, xsums, tok0, out, row0) -> None``.

    Writes ``out[tok0 + t, row0:row0 + 8]`` for t < n_tok: the 8 repacked rows times activation
    rows tok0.. of xq (int8 [n_tok_total, n_in]) with their scales and block sums (Q4_0; Q8_0
    ignores xsums).

    Q8_0 blocks are repacked as int8 weights in the same interleaved order. pmaddubsw needs an
    unsigned operand, so each group uses |w| and the activations with w's signs (psign, exact
    for activations in [-127, 127]); its pair sums reach 2 * 128 * 127, so they are widened to
    32 bits per group instead of summed in 16 bits.
    """

    def codegen(context, builder, sig, args):
        b = builder
        module = b.module
        packed = context.make_array(sig.args[0])(context, builder, args[0])
        wscales = context.make_array(sig.args[1])(context, builder, args[1])
        xq = context.make_array(sig.args[2])(context, builder, args[2])
        xs = context.make_array(sig.args[3])(context, builder, args[3])
        xsum = context.make_array(sig.args[4])(context, builder, args[4])
        tok0 = args[5]
        out = context.make_array(sig.args[6])(context, builder, args[6])
        row0 = args[7]

        def fn(name, ret, arg_types):
            return cgutils.get_or_insert_function(module, ir.FunctionType(ret, arg_types), name)

        maddubs = fn("llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
        maddwd = fn("llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
        fma = fn("llvm.fma.v8f32", _V8F32, [_V8F32] * 3)
        isa = kernel_isa()
        vnni = isa.endswith("-vnni")  # one vpdpbusd per group, accumulated in 32 bits
        wide = isa == "avx512-vnni"  # one 512-bit vpdpbusd per two groups
        psign = fn("llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
        vabs = fn("llvm.abs.v32i8", _V32I8, [_V32I8, _I1])

        def splat(value, vec_type):
            one = b.insert_element(ir.Constant(vec_type, ir.Undefined), value, ir.Constant(_I32, 0))
            return b.shuffle_vector(one, ir.Constant(vec_type, ir.Undefined), _mask([0] * vec_type.count))

        # Blocks present in every operand (a shape mismatch never reads out of bounds).
        n_blocks = b.udiv(b.extract_value(packed.shape, 0), ir.Constant(_I64, _X8_BLOCK_BYTES))
        n_blocks = _umin(b, n_blocks, b.udiv(b.extract_value(wscales.shape, 0), ir.Constant(_I64, _X8_ROWS)))
        n_blocks = _umin(b, n_blocks, b.udiv(b.extract_value(xq.shape, 1), ir.Constant(_I64, QK)))
        n_blocks = _umin(b, n_blocks, b.extract_value(xs.shape, 1))
        n_blocks = _umin(b, n_blocks, b.extract_value(xsum.shape, 1))
        w_base = _as_i8_ptr(b, packed.data)
        ws_base = b.bitcast(wscales.data, _F32.as_pointer())
        tokens = []
        for t in range(n_tok):
            tok = b.add(tok0, ir.Constant(_I64, t))
            tokens.append((_row_ptr(b, xq, tok, _I8), _row_ptr(b, xs, tok, _F32), _row_ptr(b, xsum, tok, _I32)))

        loop = _Loop(b, n_blocks, [_vconst(_V8F32, 0.0)] * n_tok, "x8")
        index, accs = loop.index, loop.values
        block_w = b.gep(w_base, [b.mul(index, ir.Constant(_I64, _X8_BLOCK_BYTES))])
        emit_prefetch(b, block_w, 2 * _X8_BLOCK_BYTES)
        sums = [None] * n_tok  # Q4_0: <16 x i16> pair sums; Q8_0: <8 x i32> lanes
        x_block = [b.gep(x_ptr, [b.mul(index, ir.Constant(_I64, QK))]) for x_ptr, _, _ in tokens]
        if wide:
            _x8_wide_groups(b, qtype, block_w, x_block, sums)
        else:
            for g in range(QK // _X8_GROUP):
                w = b.load(b.bitcast(b.gep(block_w, [ir.Constant(_I64, g * 32)]), _V32I8.as_pointer()), align=1)
                w_abs = b.call(vabs, [w, ir.Constant(_I1, 0)]) if qtype == "q8_0" else w
                for t in range(n_tok):
                    four = b.load(b.bitcast(b.gep(x_block[t], [ir.Constant(_I64, g * _X8_GROUP)]), _I32.as_pointer()),
                                  align=1)
                    x = b.bitcast(splat(four, _V8I32), _V32I8)  # the same 4 activations for each of the 8 rows
                    s8 = b.call(psign, [x, w]) if qtype == "q8_0" else x
                    if vnni:
                        sums[t] = _dpbusd(b, _vconst(_V8I32, 0) if sums[t] is None else sums[t], w_abs, s8)
                        continue
                    if qtype == "q8_0":
                        part = b.call(maddwd, [b.call(maddubs, [w_abs, s8]), _vconst(_V16I16, 1)])
                    else:
                        part = b.call(maddubs, [w, x])
                    sums[t] = part if sums[t] is None else b.add(sums[t], part)
        row_scales = b.load(b.bitcast(b.gep(ws_base, [b.mul(index, ir.Constant(_I64, _X8_ROWS))]),
                                      _V8F32.as_pointer()), align=4)
        new_accs = []
        for t, (_, scale_ptr, sum_ptr) in enumerate(tokens):
            if qtype == "q8_0" or vnni:
                lanes = sums[t]
            else:
                lanes = b.call(maddwd, [sums[t], _vconst(_V16I16, 1)])
            if qtype == "q4_0":
                # Q4_0 values are nibble - 8: take 8 * sum(x) off each row's lane
                offset = b.shl(b.load(b.gep(sum_ptr, [index]), align=4), ir.Constant(_I32, 3))
                lanes = b.sub(lanes, splat(offset, _V8I32))
            scale = b.fmul(row_scales, splat(b.load(b.gep(scale_ptr, [index]), align=4), _V8F32))
            new_accs.append(b.call(fma, [b.sitofp(lanes, _V8F32), scale, accs[t]]))
        loop.close(new_accs)
        for t in range(n_tok):
            dest = b.gep(_row_ptr(b, out, b.add(tok0, ir.Constant(_I64, t)), _F32), [row0])
            b.store(accs[t], b.bitcast(dest, _V8F32.as_pointer()), align=4)
        return context.get_dummy_value()

    def typer(typingctx, packed, scales, xq, xscales, xsums, tok0, out, row0):
        _check_array(packed, 1, types.uint8, "packed")
        _check_array(scales, 1, types.float32, "scales")
        _check_array(xq, 2, types.int8, "xq")
        _check_array(xscales, 2, types.float32, "xscales")
        _check_array(xsums, 2, types.int32, "xsums")
        _check_array(out, 2, types.float32, "out")
        return types.none(packed, scales, xq, xscales, xsums, types.intp, out, types.intp), codegen

    typer.__name__ = typer.__qualname__ = f"{qtype}_x8_tile_{n_tok}"
    return intrinsic(typer)


_X8_TILE_TOKENS = 4
_q4_0_x8_tile4 = _make_x8_tile(_X8_TILE_TOKENS)
_q4_0_x8_tile1 = _make_x8_tile(1)
_q8_0_x8_tile4 = _make_x8_tile(_X8_TILE_TOKENS, "q8_0")
_q8_0_x8_tile1 = _make_x8_tile(1, "q8_0")


@njit(cache=True)
def repack_q8_0_x8(w_raw: np.ndarray, row0: int, packed: np.ndarray, scales: np.ndarray) -> None:
    """Rows row0..row0+7 of Q8_0 weights in the x8 layout (int8 values as bytes; see repack_q4_0_x8)."""
    n_blocks = w_raw.shape[1] // Q8_0_BLOCK_BYTES
    words = packed.view(np.uint32)
    for r in range(_X8_ROWS):
        row = w_raw[row0 + r]
        for blk in range(n_blocks):
            base = blk * Q8_0_BLOCK_BYTES
            scales[blk * _X8_ROWS + r] = _f16_bits_as_f32(row[base], row[base + 1])
            out = blk * (_X8_BLOCK_BYTES // 4) + r
            for g in range(QK // _X8_GROUP):
                o = base + 2 + 4 * g
                words[out + g * _X8_ROWS] = (np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8))
                                             | (np.uint32(row[o + 2]) << np.uint32(16))
                                             | (np.uint32(row[o + 3]) << np.uint32(24)))


@njit(parallel=True, cache=True)
def matmul_q8_0_x8(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, xsums: np.ndarray, out: np.ndarray) -> None:
    """matmul_q8_0 through 8-row interleaved tiles (AVX2 only); xsums is unused (same signature as Q4_0)."""
    _check_shapes(w_raw, xq, xscales, out.shape[1], Q8_0_BLOCK_BYTES)
    if out.shape[0] != xq.shape[0]:
        raise ValueError("out: shape does not match the activations")
    n_out = w_raw.shape[0]
    n_tok = xq.shape[0]
    n_blocks = xscales.shape[1]
    n_groups = n_out // _X8_ROWS
    n_tiled = n_tok - n_tok % _X8_TILE_TOKENS
    for group in prange(n_groups):
        row0 = group * _X8_ROWS
        packed = np.empty(n_blocks * _X8_BLOCK_BYTES, np.uint8)
        scales = np.empty(n_blocks * _X8_ROWS, np.float32)
        repack_q8_0_x8(w_raw, row0, packed, scales)
        for t in range(0, n_tiled, _X8_TILE_TOKENS):
            _q8_0_x8_tile4(packed, scales, xq, xscales, xsums, t, out, row0)
        for t in range(n_tiled, n_tok):
            _q8_0_x8_tile1(packed, scales, xq, xscales, xsums, t, out, row0)
    for r in prange(n_groups * _X8_ROWS, n_out):
        for t in range(n_tok):
            out[t, r] = q8_0_row_dot(w_raw[r], xq[t], xscales[t])


@njit(parallel=True, cache=True)
def matmul_q4_0_x8(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, xsums: np.ndarray, out: np.ndarray) -> None:
    """matmul_q4_0 through 8-row interleaved tiles (AVX2 only: call it when kernel_isa() == "avx2").

    Same contract and same integer block dots as matmul_q4_0; floats are summed per row in block
    order with one FMA per block (no lanes, no horizontal sum), so results differ from the
    row-major kernels only by float rounding.
    """
    _check_shapes(w_raw, xq, xscales, out.shape[1], Q4_0_BLOCK_BYTES)
    if xsums.shape != xscales.shape or out.shape[0] != xq.shape[0]:
        raise ValueError("xsums / out: shapes do not match the activations")
    n_out = w_raw.shape[0]
    n_tok = xq.shape[0]
    n_blocks = xscales.shape[1]
    n_groups = n_out // _X8_ROWS
    n_tiled = n_tok - n_tok % _X8_TILE_TOKENS
    for group in prange(n_groups):
        row0 = group * _X8_ROWS
        packed = np.empty(n_blocks * _X8_BLOCK_BYTES, np.uint8)
        scales = np.empty(n_blocks * _X8_ROWS, np.float32)
        repack_q4_0_x8(w_raw, row0, packed, scales)
        for t in range(0, n_tiled, _X8_TILE_TOKENS):
            _q4_0_x8_tile4(packed, scales, xq, xscales, xsums, t, out, row0)
        for t in range(n_tiled, n_tok):
            _q4_0_x8_tile1(packed, scales, xq, xscales, xsums, t, out, row0)
    for r in prange(n_groups * _X8_ROWS, n_out):  # rows past the last whole group of 8
        for t in range(n_tok):
            out[t, r] = q4_0_row_dot(w_raw[r], xq[t], xscales[t], xsums[t])


def standalone_row_dot_ir(qtype: str, isa: str, gfni: bool = False) -> str:
    """LLVM IR text of a free-standing row dot, for cross-target checks (e.g. compile for aarch64);
    ``gfni``: an x86 target with GFNI (its 4-bit unpacking), never taken from this host.

    ``float {qtype}_row_dot(i8* w_row, i8* xq, float* xscales, i32* xsums, i64 n_blocks)``
    (xsums unused for Q8_0), the same loop the intrinsics emit.
    """
    module = ir.Module(name=f"{qtype}_{isa}")
    fn_type = ir.FunctionType(_F32, [_I8.as_pointer(), _I8.as_pointer(), _F32.as_pointer(), _I32.as_pointer(), _I64])
    fn = ir.Function(module, fn_type, name=f"{qtype}_row_dot")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    w_row, xq, xscales, xsums, n_blocks = fn.args
    token = (xq, xscales, xsums if qtype == "q4_0" else None)
    [dot] = _Emitter(builder, isa, qtype, gfni).tile([w_row], [token], n_blocks)
    builder.ret(dot)
    return str(module)


# --------------------------------------------------------------------------------------------
# IQ4_NL x Q8_0 (ggml's ggml_vec_dot_iq4_nl_q8_0)
# --------------------------------------------------------------------------------------------
#
# block_iq4_nl = fp16 d + 16 bytes, laid out like Q4_0 (byte j: element j in the low nibble,
# element j + 16 in the high nibble), but the nibble indexes ggml's 16-entry non-linear table
# kvalues_iq4nl: value = d * table[nibble]. The nibbles are mapped to the int8 table values in
# registers (one pshufb on x86, two tbl on arm64, a 4-level select tree in the portable IR; the
# IQ4_XS kernel's technique), and from there the block is a Q8_0 block: the same activations
# (quantize_activations_q8_0, int8 in [-127, 127]), the same exact integer lanes (sign trick +
# pmaddubsw / vpdpbusd, sdot, or widened products), the same float accumulation. |table| <= 127,
# so every bound of the Q8_0 kernels holds.

IQ4_NL_BLOCK_BYTES = 18
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class _IQ4NLEmitter(_Emitter):
    """_Emitter for IQ4_NL weight blocks: the Q8_0 block product on table-mapped nibbles."""

    def __init__(self, builder: ir.IRBuilder, isa: str, gfni: bool | None = None):
        super().__init__(builder, isa, "q8_0", gfni)  # lane_dots / token_block: the Q8_0 paths
        self.block_bytes = IQ4_NL_BLOCK_BYTES

    def _lookup16(self, codes: ir.Value) -> ir.Value:
        """<32 x i8> of KVALUES_IQ4NL[code] for codes 0..15."""
        b = self.b
        if self.x86:
            pshufb = self._llvm_fn("llvm.x86.avx2.pshuf.b", _V32I8, [_V32I8, _V32I8])
            return b.call(pshufb, [ir.Constant(_V32I8, list(KVALUES_IQ4NL) * 2), codes])
        if self.sdot:
            tbl = self._llvm_fn("llvm.aarch64.neon.tbl1.v16i8", _V16I8, [_V16I8, _V16I8])
            halves = [b.call(tbl, [ir.Constant(_V16I8, list(KVALUES_IQ4NL)), b.shuffle_vector(codes, codes, _mask(p))])
                      for p in (range(16), range(16, 32))]
            return b.shuffle_vector(halves[0], halves[1], _mask(range(32)))
        level = [ir.Constant(_V32I8, [v] * 32) for v in KVALUES_IQ4NL]
        for bit in range(4):
            set_ = b.icmp_unsigned("!=", b.and_(codes, _vconst(_V32I8, 1 << bit)), _vconst(_V32I8, 0))
            level = [b.select(set_, level[i + 1], level[i]) for i in range(0, len(level), 2)]
        return level[0]

    def weight_block(self, block_ptr: ir.Value) -> tuple[ir.Value, tuple[ir.Value, ...]]:
        scale = self._fp16_splat(block_ptr)
        weights = self._lookup16(self.nibbles(self.b.gep(block_ptr, [ir.Constant(_I64, 2)])))
        if self.sdot:
            return scale, (weights,)
        if self.x86:
            abs_fn = self._llvm_fn("llvm.abs.v32i8", _V32I8, [_V32I8, _I1])
            return scale, (self.b.call(abs_fn, [weights, ir.Constant(_I1, 0)]), weights)
        return scale, (self.b.sext(weights, _V32I16),)


def _make_iq4_nl_row_dot(isa_mode: str):
    """Intrinsic ``(w_row, xq, xscales) -> float32`` over 1-D C-contiguous arrays (IQ4_NL weights)."""

    def codegen(context, builder, sig, args):
        isa = kernel_isa() if isa_mode == "host" else "generic"
        w, xq, xs = [context.make_array(ty)(context, builder, val) for ty, val in zip(sig.args, args)]
        n_blocks = _safe_block_count(builder, w, xq, xs, None, IQ4_NL_BLOCK_BYTES, 0)
        token = (_as_i8_ptr(builder, xq.data), xs.data, None)
        [dot] = _IQ4NLEmitter(builder, isa).tile([_as_i8_ptr(builder, w.data)], [token], n_blocks)
        return dot

    def typer(typingctx, w_row, xq, xscales):
        _check_array(w_row, 1, types.uint8, "w_row")
        _check_array(xq, 1, types.int8, "xq")
        _check_array(xscales, 1, types.float32, "xscales")
        return types.float32(w_row, xq, xscales), codegen

    typer.__name__ = typer.__qualname__ = f"iq4_nl_row_dot_{isa_mode}"
    return intrinsic(typer)


def _make_iq4_nl_tile(isa_mode: str, n_tok: int):
    """Intrinsic ``(w, row0, xq, xscales, tok0) -> UniTuple(float32, n_tok)``: one IQ4_NL row times
    activation rows tok0..tok0+n_tok-1 (the caller guarantees the ranges are in bounds)."""
    ret = types.UniTuple(types.float32, n_tok)

    def codegen(context, builder, sig, args):
        isa = kernel_isa() if isa_mode == "host" else "generic"
        w = context.make_array(sig.args[0])(context, builder, args[0])
        xq = context.make_array(sig.args[2])(context, builder, args[2])
        xs = context.make_array(sig.args[3])(context, builder, args[3])
        row0, tok0 = args[1], args[4]
        n_blocks = _safe_block_count(builder, w, xq, xs, None, IQ4_NL_BLOCK_BYTES, 1)
        rows = [_row_ptr(builder, w, row0, _I8)]
        tokens = []
        for t in range(n_tok):
            tok = builder.add(tok0, ir.Constant(_I64, t))
            tokens.append((_row_ptr(builder, xq, tok, _I8), _row_ptr(builder, xs, tok, _F32), None))
        dots = _IQ4NLEmitter(builder, isa).tile(rows, tokens, n_blocks)
        return context.make_tuple(builder, ret, dots)

    def typer(typingctx, w, row0, xq, xscales, tok0):
        _check_array(w, 2, types.uint8, "w")
        _check_array(xq, 2, types.int8, "xq")
        _check_array(xscales, 2, types.float32, "xscales")
        return ret(w, types.intp, xq, xscales, types.intp), codegen

    typer.__name__ = typer.__qualname__ = f"iq4_nl_tile_1x{n_tok}_{isa_mode}"
    return intrinsic(typer)


#: iq4_nl_row_dot(w_row: uint8[n/32*18], xq: int8[n], xscales: float32[n/32]) -> float32
iq4_nl_row_dot = _make_iq4_nl_row_dot("host")
iq4_nl_row_dot_generic = _make_iq4_nl_row_dot("generic")
_iq4_nl_tile_1x4 = _make_iq4_nl_tile("host", _TILE_TOKENS)
_iq4_nl_tile_1x4_generic = _make_iq4_nl_tile("generic", _TILE_TOKENS)


@njit(parallel=True, cache=True)
def matvec_iq4_nl(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(IQ4_NL row r of w_raw[n_out, n_in/32*18], Q8_0 activations); rows over threads."""
    _check_shapes(w_raw, xq, xscales, out.shape[0], IQ4_NL_BLOCK_BYTES)
    for r in prange(w_raw.shape[0]):
        out[r] = iq4_nl_row_dot(w_raw[r], xq, xscales)


@njit(parallel=True, cache=True)
def matvec_iq4_nl_generic(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """matvec_iq4_nl with the portable IR."""
    _check_shapes(w_raw, xq, xscales, out.shape[0], IQ4_NL_BLOCK_BYTES)
    for r in prange(w_raw.shape[0]):
        out[r] = iq4_nl_row_dot_generic(w_raw[r], xq, xscales)


@njit(parallel=True, cache=True)
def matmul_iq4_nl(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = dot(IQ4_NL row r, Q8_0 activation row t) for xq[n_tok, n_in]; as matmul_q8_0
    (16-row chunks in parallel, 1 row x 4 tokens tiles, then the remaining tokens one at a time)."""
    _check_shapes(w_raw, xq, xscales, out.shape[1], IQ4_NL_BLOCK_BYTES)
    if out.shape[0] != xq.shape[0]:
        raise ValueError("out: shape does not match the activations")
    n_tok = xq.shape[0]
    n_tiled = n_tok - n_tok % _TILE_TOKENS
    n_chunks = (w_raw.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK
    for chunk in prange(n_chunks):
        first = chunk * _ROW_CHUNK
        last = min(first + _ROW_CHUNK, w_raw.shape[0])
        for t in range(0, n_tiled, _TILE_TOKENS):
            for r in range(first, last):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _iq4_nl_tile_1x4(w_raw, r, xq, xscales, t)
        for t in range(n_tiled, n_tok):
            for r in range(first, last):
                out[t, r] = iq4_nl_row_dot(w_raw[r], xq[t], xscales[t])


@njit(parallel=True, cache=True)
def matmul_iq4_nl_generic(w_raw: np.ndarray, xq: np.ndarray, xscales: np.ndarray, out: np.ndarray) -> None:
    """matmul_iq4_nl with the portable IR."""
    _check_shapes(w_raw, xq, xscales, out.shape[1], IQ4_NL_BLOCK_BYTES)
    if out.shape[0] != xq.shape[0]:
        raise ValueError("out: shape does not match the activations")
    n_tok = xq.shape[0]
    n_tiled = n_tok - n_tok % _TILE_TOKENS
    n_chunks = (w_raw.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK
    for chunk in prange(n_chunks):
        first = chunk * _ROW_CHUNK
        last = min(first + _ROW_CHUNK, w_raw.shape[0])
        for t in range(0, n_tiled, _TILE_TOKENS):
            for r in range(first, last):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = _iq4_nl_tile_1x4_generic(
                    w_raw, r, xq, xscales, t
                )
        for t in range(n_tiled, n_tok):
            for r in range(first, last):
                out[t, r] = iq4_nl_row_dot_generic(w_raw[r], xq[t], xscales[t])


def standalone_iq4_nl_row_dot_ir(isa: str, gfni: bool = False) -> str:
    """LLVM IR text of a free-standing IQ4_NL row dot (see standalone_row_dot_ir):
    ``float iq4_nl_row_dot(i8* w_row, i8* xq, float* xscales, i64 n_blocks)``."""
    module = ir.Module(name=f"iq4_nl_{isa}")
    fn_type = ir.FunctionType(_F32, [_I8.as_pointer(), _I8.as_pointer(), _F32.as_pointer(), _I64])
    fn = ir.Function(module, fn_type, name="iq4_nl_row_dot")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    w_row, xq, xscales, n_blocks = fn.args
    [dot] = _IQ4NLEmitter(builder, isa, gfni).tile([w_row], [(xq, xscales, None)], n_blocks)
    builder.ret(dot)
    return str(module)
