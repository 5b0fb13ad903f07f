"""Integer SIMD products for llama.cpp's grid and ternary types against Q8_K activations:
IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (a magnitude from a grid, a sign per weight), IQ1_S, IQ1_M
(-1, 0 or 1 from a grid, shifted by +-1/8) and TQ1_0, TQ2_0 (ternary).

Each type is decoded the way kquant_simd decodes the K-quants: per 32 weights, int8 codes and an
integer scale per 16 weights, with ``weight = factor * d * scale * value`` exactly; then
kquant_simd's group dots (the same lanes on every ISA, so the same floats on every path) and one
float multiply-add per super-block and token. Per family:

* grid types: value = a grid magnitude (IQ2: 8, 25, 43; IQ3_XXS: 4..62; IQ3_S: 1..15) with a
  sign; scale ``2 * ls + 1`` of a 4-bit ``ls``; factor 1/8 (IQ2), 1/4 (IQ3_XXS), 1 (IQ3_S). The
  signs are bits (IQ2_S, IQ3_S) or a 7-bit index into ggml's ``ksigns`` (the 8th sign is the
  parity). x86 negates the activations where a weight is negative (pmaddubsw wants the weight
  unsigned), the other ISAs the weights.
* IQ1_S/IQ1_M: ``8 * (grid + delta) = 8 * grid +- 1``, kept as code = value + 9 (0..18) with
  ``9 * sum_j scale_j * bsum_j`` taken off from the activations' sums of 16; factor 1/8.
* TQ1_0/TQ2_0: code = value + 1 (a trit 0..2), the activations' sums taken off; factor 1.

The grids and ``ksigns`` are the ``gguf`` package's tables, decoded once at import and emitted
as constant arrays of the compiled code.

Layouts (ggml-common.h; d is an fp16 super-block scale)::

    IQ2_XXS (66): d, then per 32 weights two u32: 4 grid indices (bytes), 4 x 7-bit signs | ls << 28
    IQ2_XS  (74): d, qs[32] u16 (9-bit index | 7-bit signs << 9), scales[8] (4 bits per 16 weights)
    IQ2_S   (82): d, qs[32] (index low 8 bits), signs[32], qh[8] (2 high bits each), scales[8]
    IQ3_XXS (98): d, qs[64] (indices of 4 weights), per 32 weights a u32: 4 x 7-bit signs | ls << 28
    IQ3_S  (110): d, qs[64] (index low 8 bits), qh[8] (9th bits), signs[32], scales[4]
    IQ1_S   (50): d, qs[32] (index low 8 bits), qh[8] u16: 4 x 3 high bits | ls << 12 | delta sign << 15
    IQ1_M   (56): qs[32], qh[16] (a nibble per 8 weights: 3 high bits | delta sign << 3),
                  scales[4] u16 (4 x 3-bit ls per u16; their top nibbles are d's 16 bits)
    TQ1_0   (54): qs[48] (5 trits per byte, base 3, scaled to 8 bits), qh[4] (4 trits each), d
    TQ2_0   (66): qs[64] (four 2-bit trits per byte), d
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from llvmlite import ir

from engine.kernels.kquant_simd import _KEmitter, make_drivers
from engine.kernels.simd import _F32, _I8, _I16, _I32, _I64, _V16I8, _V32I8, _mask, emit_f16_bits_to_f32

TYPES = ("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m", "tq1_0", "tq2_0")
_V16I32 = ir.VectorType(_I32, 16)


def _packed_grid(name: str, to_code) -> list[int]:
    """gguf's grid of type ``name`` as one little-endian integer per entry (8 or 4 int8 codes)."""
    cls = getattr(gguf_quants, name)
    cls.init_grid()
    codes = to_code(cls.grid.reshape(cls.grid_shape)).astype(np.uint8)
    return [int(v) for v in np.ascontiguousarray(codes).view("<u8" if codes.shape[1] == 8 else "<u4").ravel()]


# name -> (element type, values)
_TABLES = {
    "halfbyte_iq2xxs_grid": (_I64, _packed_grid("IQ2_XXS", lambda g: g)),
    "halfbyte_iq2xs_grid": (_I64, _packed_grid("IQ2_XS", lambda g: g)),
    "halfbyte_iq2s_grid": (_I64, _packed_grid("IQ2_S", lambda g: g)),
    "halfbyte_iq3xxs_grid": (_I32, _packed_grid("IQ3_XXS", lambda g: g)),
    "halfbyte_iq3s_grid": (_I32, _packed_grid("IQ3_S", lambda g: g)),
    "halfbyte_iq1s_grid": (_I64, _packed_grid("IQ1_S", lambda g: 8 * g + 8)),  # 0, 8, 16: 8 * grid + 8
    "halfbyte_ksigns": (_I8, list(np.frombuffer(gguf_quants.IQ2_XXS.ksigns, np.uint8))),
}


def _table(module: ir.Module, name: str) -> ir.GlobalVariable:
    """The constant array ``name`` of the module being compiled (emitted once per module)."""
    try:
        return module.get_global(name)
    except KeyError:
        pass
    elem, values = _TABLES[name]
    bits = elem.width
    array = ir.ArrayType(elem, len(values))
    table = ir.GlobalVariable(module, array, name=name)
    table.linkage = "internal"
    table.global_constant = True
    table.initializer = ir.Constant(array, [int(v) - (1 << bits) if int(v) >> (bits - 1) else int(v) for v in values])
    return table


def _signed_i8(values) -> list[int]:
    return [v - 256 if v > 127 else v for v in values]


class _IQEmitter(_KEmitter):
    """kquant_simd's super-block loop with the decoders of the grid and ternary types."""

    BLOCK_BYTES = {name: GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]][1] for name in TYPES}

    # ---- small IR helpers ------------------------------------------------------------------------

    def _c(self, v: int) -> ir.Constant:
        return ir.Constant(_I32, v)

    def _byte(self, block: ir.Value, offset: int) -> ir.Value:
        return self.b.zext(self._load(block, offset, _I8), _I32)

    def _u16(self, block: ir.Value, offset: int) -> ir.Value:
        return self.b.zext(self._load(block, offset, _I16), _I32)

    def _bits(self, word: ir.Value, shift: int, mask: int) -> ir.Value:
        b = self.b
        return b.and_(b.lshr(word, self._c(shift)) if shift else word, self._c(mask))

    def _index(self, block: ir.Value, offset: int, high: ir.Value) -> ir.Value:
        """A grid index: the byte at ``offset`` and ``high`` as bits 8 and up."""
        return self.b.or_(self._byte(block, offset), self.b.shl(high, self._c(8)))

    def _odd(self, ls: ir.Value) -> ir.Value:
        """2 * ls + 1: the integer scale of the 0.5 + ls (or 1 + 2 * ls) of ggml's dequantizers."""
        return self.b.add(self.b.shl(ls, self._c(1)), self._c(1))

    def _vector(self, scalars: list[ir.Value], elem: ir.Type) -> ir.Value:
        b = self.b
        vec = ir.Constant(ir.VectorType(elem, len(scalars)), ir.Undefined)
        for i, s in enumerate(scalars):
            vec = b.insert_element(vec, b.trunc(s, elem) if s.type != elem else s, self._c(i))
        return vec

    def _grid(self, table: str, indices: list[ir.Value]) -> ir.Value:
        """<32 x i8>: the grid entries (8 or 4 codes each) of the indices, in order."""
        b = self.b
        grid = _table(b.module, table)
        entries = [b.load(b.gep(grid, [self._c(0), i])) for i in indices]
        return b.bitcast(self._vector(entries, entries[0].type), _V32I8)

    def _spread(self, vec4: ir.Value) -> ir.Value:
        """<32 x i8> from <4 x i8>: byte l for elements 8l..8l+7."""
        return self.b.shuffle_vector(vec4, vec4, _mask([i // 8 for i in range(32)]))

    def _sign_mask(self, sign_bytes: ir.Value) -> ir.Value:
        """<32 x i8>, -1 where bit i % 8 of byte i // 8 of the <4 x i8> ``sign_bytes`` is set."""
        b = self.b
        bits = b.and_(self._spread(sign_bytes), ir.Constant(_V32I8, _signed_i8([1 << (i % 8) for i in range(32)])))
        return b.sext(b.icmp_unsigned("!=", bits, ir.Constant(_V32I8, [0] * 32)), _V32I8)

    def _ksigns(self, indices: list[ir.Value]) -> ir.Value:
        """<4 x i8>: ggml's ksigns bytes (7 sign bits and their parity) of four 7-bit indices."""
        b = self.b
        table = _table(b.module, "halfbyte_ksigns")
        return self._vector([b.load(b.gep(table, [self._c(0), i])) for i in indices], _I8)

    def _trits(self, packed: ir.Value, power: int) -> ir.Value:
        """TQ1_0's trit of every byte: ``((byte * 3**k mod 256) * 3) >> 8`` (ggml's base-3 packing)."""
        b = self.b
        n = packed.type.count
        v16 = ir.VectorType(_I16, n)
        scaled = b.mul(packed, ir.Constant(packed.type, _signed_i8([power % 256] * n)))
        return b.trunc(b.lshr(b.mul(b.zext(scaled, v16), ir.Constant(v16, [3] * n)), ir.Constant(v16, [8] * n)),
                       packed.type)

    # ---- per type: (factor * d, per token <8 x i32>) ---------------------------------------------

    def block_sums(self, block: ir.Value, tokens) -> tuple[ir.Value, list[ir.Value]]:
        b = self.b
        dots = self._new_dots(tokens)
        q = self.qtype
        if q in ("iq1_s", "iq1_m", "tq1_0", "tq2_0"):
            d, offset, scales16 = self._offset_groups(block, tokens, dots)
            isums = self._finish_dots(dots)
            weights = self._vector(scales16, _I32) if scales16 else ir.Constant(_V16I32, [1] * 16)
            out = []
            for isum, (_, _, bsum_ptr) in zip(isums, tokens):
                bias = self._weighted_bsums(weights, bsum_ptr)
                out.append(b.sub(isum, b.mul(bias, ir.Constant(bias.type, [offset] * 8))))
        else:
            self._signed_groups(block, tokens, dots)
            out = self._finish_dots(dots)
            d = self._fp16(block, 0)
        return self.scaled_d(d), out

    def scaled_d(self, d: ir.Value) -> ir.Value:
        """The super-block's d times the type's constant factor (the integer scales are 2 * ls + 1 of
        ggml's 0.5 + ls, and IQ1's codes 8 * (grid + delta))."""
        factor = {"iq3_xxs": 0.25, "iq3_s": 1.0, "tq1_0": 1.0, "tq2_0": 1.0}.get(self.qtype, 0.125)
        return d if factor == 1.0 else self.b.fmul(d, ir.Constant(_F32, factor))

    def _signed_groups(self, block: ir.Value, tokens, dots) -> None:
        """The grid types: magnitudes, sign masks and scales of the 8 groups of 32 weights."""
        b, q = self.b, self.qtype
        for g in range(8):
            if q == "iq2_xxs":
                aux = self._load(block, 6 + 8 * g, _I32)
                mag = self._grid("halfbyte_iq2xxs_grid", [self._byte(block, 2 + 8 * g + i) for i in range(4)])
                signs = self._ksigns([self._bits(aux, 7 * i, 127) for i in range(4)])
                s_lo = s_hi = self._odd(b.lshr(aux, self._c(28)))
            elif q == "iq2_xs":
                words = [self._u16(block, 2 + 8 * g + 2 * i) for i in range(4)]
                mag = self._grid("halfbyte_iq2xs_grid", [self._bits(w, 0, 511) for w in words])
                signs = self._ksigns([b.lshr(w, self._c(9)) for w in words])
                scales = self._byte(block, 66 + g)
                s_lo, s_hi = self._odd(self._bits(scales, 0, 15)), self._odd(self._bits(scales, 4, 15))
            elif q == "iq2_s":
                qh = self._byte(block, 66 + g)
                mag = self._grid("halfbyte_iq2s_grid",
                                 [self._index(block, 2 + 4 * g + i, self._bits(qh, 2 * i, 3)) for i in range(4)])
                signs = self._load(block, 34 + 4 * g, ir.VectorType(_I8, 4))
                scales = self._byte(block, 74 + g)
                s_lo, s_hi = self._odd(self._bits(scales, 0, 15)), self._odd(self._bits(scales, 4, 15))
            elif q == "iq3_xxs":
                aux = self._load(block, 66 + 4 * g, _I32)
                mag = self._grid("halfbyte_iq3xxs_grid", [self._byte(block, 2 + 8 * g + i) for i in range(8)])
                signs = self._ksigns([self._bits(aux, 7 * i, 127) for i in range(4)])
                s_lo = s_hi = self._odd(b.lshr(aux, self._c(28)))
            else:  # iq3_s
                qh = self._byte(block, 66 + g)
                mag = self._grid("halfbyte_iq3s_grid",
                                 [self._index(block, 2 + 8 * g + i, self._bits(qh, i, 1)) for i in range(8)])
                signs = self._load(block, 74 + 4 * g, ir.VectorType(_I8, 4))
                s_lo = s_hi = self._odd(self._bits(self._byte(block, 106 + g // 2), 4 * (g % 2), 15))
            self._token_dots(dots, tokens, mag, 32 * g, s_lo, s_hi, sign_mask=self._sign_mask(signs))

    def _offset_groups(self, block: ir.Value, tokens, dots) -> tuple[ir.Value, int, list[ir.Value]]:
        """IQ1_S, IQ1_M, TQ1_0, TQ2_0: the code groups into ``dots``; returns (d, the offset of the
        codes, the 16 scales of 16 weights, or [] for all ones)."""
        b, q = self.b, self.qtype
        scales16: list[ir.Value] = []
        if q == "tq2_0":
            for g in range(8):
                packed = self._load(block, 32 * (g // 4), _V32I8)
                shift = 2 * (g % 4)
                codes = b.and_(b.lshr(packed, ir.Constant(_V32I8, [shift] * 32)) if shift else packed,
                               ir.Constant(_V32I8, [3] * 32))
                self._token_dots(dots, tokens, codes, 32 * g, self._c(1), self._c(1))
            return self._fp16(block, 64), 1, scales16
        if q == "tq1_0":
            low = self._load(block, 0, _V32I8)
            mid = self._load(block, 32, _V16I8)
            high = self._load(block, 48, ir.VectorType(_I8, 4))
            mid_trits = [self._trits(mid, 3**k) for k in range(5)]
            high_trits = [self._trits(high, 3**k) for k in range(4)]
            high16 = b.shuffle_vector(b.shuffle_vector(high_trits[0], high_trits[1], _mask(range(8))),
                                      b.shuffle_vector(high_trits[2], high_trits[3], _mask(range(8))), _mask(range(16)))
            groups = [self._trits(low, 3**k) for k in range(5)] + [
                b.shuffle_vector(mid_trits[0], mid_trits[1], _mask(range(32))),
                b.shuffle_vector(mid_trits[2], mid_trits[3], _mask(range(32))),
                b.shuffle_vector(mid_trits[4], high16, _mask(range(32)))]
            for g, codes in enumerate(groups):
                self._token_dots(dots, tokens, codes, 32 * g, self._c(1), self._c(1))
            return self._fp16(block, 52), 1, scales16
        if q == "iq1_s":
            for g in range(8):
                qh = self._u16(block, 34 + 2 * g)
                mag = self._grid("halfbyte_iq1s_grid",
                                 [self._index(block, 2 + 4 * g + i, self._bits(qh, 3 * i, 7)) for i in range(4)])
                # delta +1/8 (code + 2 over 8 * grid + 8) unless bit 15 says -1/8 (code + 0)
                shift = b.trunc(b.sub(self._c(2), b.shl(self._bits(qh, 15, 1), self._c(1))), _I8)
                codes = b.add(mag, self._splat(shift, _V32I8))
                scale = self._odd(self._bits(qh, 12, 7))
                scales16 += [scale, scale]
                self._token_dots(dots, tokens, codes, 32 * g, scale, scale)
            return self._fp16(block, 0), 9, scales16
        # iq1_m: d from the top nibbles of the four scale words
        words = [self._u16(block, 48 + 2 * k) for k in range(4)]
        d_bits = b.or_(b.or_(b.lshr(words[0], self._c(12)), b.and_(b.lshr(words[1], self._c(8)), self._c(0xF0))),
                       b.or_(b.and_(b.lshr(words[2], self._c(4)), self._c(0xF00)), b.and_(words[3], self._c(0xF000))))
        d = emit_f16_bits_to_f32(b, b.trunc(d_bits, _I16))
        for g in range(8):
            nibbles = [self._bits(self._byte(block, 32 + 2 * g + i // 2), 4 * (i % 2), 15) for i in range(4)]
            mag = self._grid("halfbyte_iq1s_grid",
                             [self._index(block, 4 * g + i, b.and_(nibbles[i], self._c(7))) for i in range(4)])
            shifts = [b.sub(self._c(2), b.lshr(b.and_(n, self._c(8)), self._c(2))) for n in nibbles]  # bit 3: -1/8
            codes = b.add(mag, self._spread(self._vector(shifts, _I8)))
            word = words[g // 2]
            s_lo = self._odd(self._bits(word, 6 * (g % 2), 7))
            s_hi = self._odd(self._bits(word, 6 * (g % 2) + 3, 7))
            scales16 += [s_lo, s_hi]
            self._token_dots(dots, tokens, codes, 32 * g, s_lo, s_hi)
        return d, 9, scales16


# Host batches take 16-token tiles first (the grid lookups are dear, so they pay off over more
# tokens), then one 8-token tile, then single tokens. Measured (Intel Xeon, 1 thread, IQ2_XXS
# 5632x2048, 64 tokens): 18.2 ms with 8-token tiles, 15.6 with 16, 18.4 with 32.
# qtype -> (matvec, matmul, portable matvec, portable matmul); each ``(w, xq, xd, xs, out)`` with the
# activations from kquant_simd.activations_for (int16 sums of 16)
DRIVERS = {qtype: make_drivers(qtype, _IQEmitter, tiles=True) for qtype in TYPES}
