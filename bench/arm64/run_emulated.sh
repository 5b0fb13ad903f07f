#!/usr/bin/env bash
# halfbyte on arm64 (Raspberry Pi class), emulated on an x86-64 Debian/Ubuntu machine with qemu-user.
#
#   bench/arm64/run_emulated.sh            # HOST_PYTHON=/path/to/venv/bin/python to pick the x86 Python
#
# 1. qemu-user-static (apt-get, if missing). binfmt_misc is not needed: arm64 programs are
#    started explicitly, `qemu-aarch64-static -L $ROOT $ROOT/usr/bin/python3.11 ...`.
# 2. An arm64 Python 3.11 userland: Debian's arm64 .debs (apt-get download), unpacked with
#    dpkg-deb -x into $ROOT. No chroot, no debootstrap, nothing installed system-wide.
# 3. arm64 wheels from PyPI (host pip, --platform manylinux_*_aarch64), same versions as the host.
# 4. Under emulation, twice: as a Cortex-A76 (Raspberry Pi 5: the dot-product `sdot` kernels must
#    be picked at start-up) and as a Cortex-A72 (Raspberry Pi 4: the portable NEON kernels). Each
#    time: machine_info(), the CLI, Q4_0/Q8_0 kernel outputs on seeded data (the sdot ones must be
#    bit-identical to x86's), greedy generation on two tiny random-weight GGUF files (Q4_0, Q8_0)
#    made on the host (the arm64 token ids must equal the x86 ones) and a torch-free test subset.
#
# Idempotent: everything is cached under $ARM64_WORK (default ~/.cache/halfbyte/arm64); a second
# run only re-runs steps 4-5. Prints PASS/FAIL per part and exits 1 on any failed check, 77 if the
# emulation could not be set up (no apt-get, no root or password-less sudo, no package mirror).
# Needs root (or sudo) only for apt-get: installing qemu-user-static, adding the arm64 architecture.
#
# ARM64_SMOKE=1: the short form the test suite runs (tests/test_arm64_emulated.py): per emulated
# CPU machine_info() and the kernel outputs; greedy Q4_0 on the Cortex-A76 only; no pytest subset.

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${ARM64_WORK:-$HOME/.cache/halfbyte/arm64}
HOST_PYTHON=${HOST_PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
HOST_PYTHON=${HOST_PYTHON:-python3}
ROOT=$WORK/root
SITE=$WORK/site-packages
LOGS=$WORK/logs
OUT=$WORK/results
NICE=${NICE:-nice -n 19}
N_TOKENS=${N_TOKENS:-16}
SMOKE=${ARM64_SMOKE:-0}
export KERNEL_OUTPUTS_ALL=$((1 - SMOKE))  # kernel_outputs.py: every integer type in the full check

# Torch-free tests that finish in minutes under qemu (tests/tiny_models.py and the files that
# import it need torch/transformers). Override with ARM64_TESTS="tests/test_x.py ...".
# tests/test_matmul.py needs libgomp1 in the userland (Numba's OpenMP threading layer): with the
# fallback workqueue layer it hung under qemu-user. Not here: tests/test_gguf_file.py and
# tests/test_tokenizer.py (torch-free but ~240 tests: too slow emulated).
TESTS=${ARM64_TESTS:-"tests/test_quants.py tests/test_simd.py tests/test_matmul.py tests/test_cpu_target.py
 tests/test_kquant_simd.py tests/test_run_cli.py tests/test_bench.py tests/test_tokenize_cli.py"}
# On the Cortex-A72 (no dot product: the portable kernels) only the kernel tests run again.
TESTS_A72=${ARM64_TESTS_A72:-"tests/test_simd.py tests/test_matmul.py tests/test_cpu_target.py
 tests/test_kquant_simd.py"}
# Known arm64 differences, run apart and reported but not counted. The reference is numpy on the
# CPU it runs on; halfbyte's kernels give x86's answers everywhere (engine/quants.py module doc):
# which NaN (sign, payload) comes out when NaNs meet (d * q + m with d and m both NaN; float32 ->
# float16 of a NaN), and the code of an out-of-range float -> uint8 cast (x86: 0; arm64 numpy
# saturates to 255), which hypothesis reaches with subnormal blocks.
KNOWN="tests/test_quants.py::test_dequantize_inf_and_nan_scales_matches_reference
 tests/test_quants.py::test_dequantize_arbitrary_bytes_matches_reference
 tests/test_quants.py::test_f32_to_f16_matches_numpy_on_every_exponent_and_rounding_edge
 tests/test_quants.py::test_quantize_matches_reference_on_any_floats"
# Deselected: compiles every kernel again in a fresh (emulated) process within a 300 s timeout.
SLOW="tests/test_simd.py::test_compiled_kernels_load_from_cache_in_a_new_process"
TEST_TIMEOUT=${ARM64_TEST_TIMEOUT:-2400}  # seconds; a hang under qemu must not block forever

# Debian arm64 packages for python3.11 + the shared libraries numpy/numba/llvmlite/tokenizers load.
DEBS="libc6 libgcc-s1 libstdc++6 gcc-12-base zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0
 libcrypt1 libncursesw6 libtinfo6 libreadline8 libuuid1 libnsl2 libtirpc3 libgssapi-krb5-2 libk5crypto3
 libkrb5-3 libkrb5support0 libkeyutils1 libcom-err2 libdb5.3 libpython3.11-minimal libpython3.11-stdlib
 python3.11-minimal python3.11 libgomp1"
# Python packages: the runtime dependencies of pyproject.toml plus the test runner.
WHEELS="numpy numba llvmlite sentencepiece safetensors huggingface_hub click gguf tokenizers tqdm pytest hypothesis"

mkdir -p "$WORK" "$LOGS" "$OUT"
declare -a SUMMARY=()
FAILED=0
say() { printf '\n=== %s\n' "$*"; }
record() {  # record NAME STATUS SECONDS [DETAIL]
    SUMMARY+=("$(printf '%-34s %-5s %6ss  %s' "$1" "$2" "$3" "${4:-}")")
    [[ $2 == FAIL ]] && FAILED=1
    return 0
}
finish() {
    say "SUMMARY (work dir $WORK, logs in $LOGS)"
    printf '%s\n' "${SUMMARY[@]}"
    if ((FAILED)); then echo "RESULT: FAIL"; exit 1; fi
    echo "RESULT: PASS"
    exit 0
}
setup_failed() {  # nothing was checked: the machine cannot host the emulation
    say "SUMMARY (work dir $WORK, logs in $LOGS)"
    printf '%s\n' "${SUMMARY[@]}"
    echo "RESULT: SETUP FAILED"
    exit 77
}
as_root() {  # never prompts: without root or password-less sudo, set-up fails
    if [[ $(id -u) == 0 ]]; then "$@"; elif sudo -n true 2>/dev/null; then sudo -n "$@"; else return 1; fi
}

# -- 1. qemu-user-static ---------------------------------------------------------------------------
say "1. qemu-user-static"
t0=$SECONDS
if ! command -v qemu-aarch64-static >/dev/null; then
    { as_root apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static; } >"$LOGS/qemu-install.log" 2>&1
fi
if command -v qemu-aarch64-static >/dev/null; then
    record "qemu-user-static" PASS $((SECONDS - t0)) "$(qemu-aarch64-static --version | head -1)"
else
    record "qemu-user-static" FAIL $((SECONDS - t0)) "see $LOGS/qemu-install.log"
    setup_failed
fi

# -- 2. arm64 Python userland ----------------------------------------------------------------------
say "2. arm64 Python 3.11 userland in $ROOT"
t0=$SECONDS
STAMP="$ROOT/.halfbyte-$(echo "$DEBS" | md5sum | cut -c1-12)"
if [[ ! -e $STAMP ]]; then
    if ! dpkg --print-foreign-architectures 2>/dev/null | grep -qx arm64; then
        as_root dpkg --add-architecture arm64
        as_root apt-get update -qq
    elif ! apt-cache show python3.11:arm64 >/dev/null 2>&1; then
        as_root apt-get update -qq
    fi
    rm -rf "$WORK/debs" "$ROOT"
    mkdir -p "$WORK/debs" "$ROOT"
    # apt-get download writes into the current directory; world-writable so the _apt user can too.
    chmod 777 "$WORK/debs"
    arm64_debs=$(for p in $DEBS; do printf '%s:arm64 ' "$p"; done)
    # shellcheck disable=SC2086
    if (cd "$WORK/debs" && apt-get download $arm64_debs media-types) >"$LOGS/debs.log" 2>&1; then
        for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
        touch "$STAMP"
    fi
fi
# The arm64 interpreter behind an x86 wrapper script. qemu's -0 sets argv[0], so sys.executable is
# the wrapper and subprocesses started from it ([sys.executable, ...] in tests) run emulated too.
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec qemu-aarch64-static -L "%s" -0 "$0" "%s" "$@"\n' "$ROOT" "$ROOT/usr/bin/python3.11" \
    >"$WORK/bin/python3"
chmod +x "$WORK/bin/python3"
PY_ARM=("$WORK/bin/python3")
if [[ -e $STAMP ]] && "${PY_ARM[@]}" -c "import ssl, sqlite3, lzma, bz2, ctypes, platform; assert platform.machine() == 'aarch64'" \
    >>"$LOGS/debs.log" 2>&1; then
    record "arm64 userland (.debs)" PASS $((SECONDS - t0)) "$(du -sh "$ROOT" | cut -f1)"
else
    record "arm64 userland (.debs)" FAIL $((SECONDS - t0)) "see $LOGS/debs.log"
    setup_failed
fi

# -- 3. arm64 wheels -------------------------------------------------------------------------------
say "3. arm64 wheels in $SITE"
t0=$SECONDS
# The host's versions, so that x86 and arm64 run the same numpy/numba/llvmlite.
REQS=$("$HOST_PYTHON" - "$WHEELS" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1].split():
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
) || { record "host python" FAIL 0 "HOST_PYTHON=$HOST_PYTHON does not run"; finish; }
WSTAMP="$SITE/.halfbyte-$(echo "$REQS" | md5sum | cut -c1-12)"
if [[ ! -e $WSTAMP ]]; then
    rm -rf "$SITE" "$SITE.tmp"
    # pip does not widen --platform to older glibc tags: list every manylinux tag Debian 12's glibc 2.36 runs.
    # shellcheck disable=SC2046,SC2086
    if "$HOST_PYTHON" -m pip install --quiet --no-compile --target "$SITE.tmp" --only-binary=:all: \
        --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
        $(for v in 2014 _2_24 _2_26 _2_27 _2_28 _2_31 _2_34 _2_35 _2_36; do printf -- '--platform manylinux%s_aarch64 ' $v; done) \
        $REQS >"$LOGS/wheels.log" 2>&1; then
        mv "$SITE.tmp" "$SITE" && touch "$WSTAMP"
    fi
fi
if [[ -e $WSTAMP ]]; then
    record "arm64 wheels (pip --platform)" PASS $((SECONDS - t0)) "$(echo $REQS | tr '\n' ' ' | cut -c1-80)..."
else
    record "arm64 wheels (pip --platform)" FAIL $((SECONDS - t0)) "see $LOGS/wheels.log"
    setup_failed
fi

# Everything below runs arm64 code in the emulator: halfbyte from this checkout, the wheels,
# a Numba cache of its own. The working directory is $WORK (pytest/hypothesis caches land there).
ARM_ENV=(env PYTHONPATH="$REPO:$SITE" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
    NUMBA_CACHE_DIR="$WORK/numba-cache" HALFBYTE_CACHE="$WORK/halfbyte-cache")
arm() { (cd "$WORK" && $NICE "${ARM_ENV[@]}" "${PY_ARM[@]}" "$@"); }
arm_cmd() { (cd "$WORK" && $NICE "${ARM_ENV[@]}" "$@"); }

# -- 4. host side: tiny models and the x86 reference tokens -----------------------------------------
say "4. tiny GGUF files and x86 greedy tokens (host, $HOST_PYTHON)"
t0=$SECONDS
(
    cd "$REPO" || exit 1
    $NICE "$HOST_PYTHON" bench/arm64/make_models.py "$WORK/models" >"$LOGS/x86.log" 2>&1 || exit 1
    for q in q4_0 q8_0; do
        $NICE "$HOST_PYTHON" bench/arm64/greedy.py "$WORK/models/tiny-$q.gguf" "$N_TOKENS" "$OUT/x86-$q.npy" \
            >"$OUT/x86-$q.json" 2>>"$LOGS/x86.log" || exit 1
    done
    $NICE "$HOST_PYTHON" bench/arm64/kernel_outputs.py "$OUT/kernels-x86.npz" >>"$LOGS/x86.log" 2>&1 || exit 1
) && record "x86 models + greedy" PASS $((SECONDS - t0)) || {
    record "x86 models + greedy" FAIL $((SECONDS - t0)) "see $LOGS/x86.log"
    finish
}

# -- 5. under emulation, once per emulated CPU ------------------------------------------------------
# qemu-user takes the CPU model from QEMU_CPU and reports its features to the program through the
# auxiliary vector (getauxval(AT_HWCAP)), which is what halfbyte's start-up check reads: Cortex-A76
# (Raspberry Pi 5) has the dot-product extension, so the `sdot` kernels must be picked; Cortex-A72
# (Raspberry Pi 4) has not, so the portable (NEON) kernels must be.
run_cpu() {  # run_cpu CPU EXPECTED_KERNELS TESTS
    local cpu=$1 expect=$2 cpu_tests=$3 q t0 detail verdict rc line tests deselect known
    export QEMU_CPU=$cpu

    say "5a. $cpu: machine_info(), halfbyte info, kernel outputs against x86"
    t0=$SECONDS
    if arm -c "import json; from engine.machine import machine_info; print(json.dumps(machine_info()))" \
        >"$OUT/machine_info-$cpu.json" 2>"$LOGS/machine-$cpu.log" &&
        arm -m engine info "$WORK/models/tiny-q4_0.gguf" >"$OUT/info-$cpu.txt" 2>>"$LOGS/machine-$cpu.log"; then
        cat "$OUT/machine_info-$cpu.json"
        head -5 "$OUT/info-$cpu.txt"
        detail=$("$HOST_PYTHON" -c "import json,sys; m=json.load(open(sys.argv[1])); \
print(m['machine'], m['kernels'], ','.join(m['cpu_features']) or '-')" "$OUT/machine_info-$cpu.json")
        if [[ $detail == "aarch64 $expect "* ]]; then
            record "$cpu: machine_info + info" PASS $((SECONDS - t0)) "$detail"
        else
            record "$cpu: machine_info + info" FAIL $((SECONDS - t0)) "expected aarch64 $expect: $detail"
        fi
    else
        record "$cpu: machine_info + info" FAIL $((SECONDS - t0)) "see $LOGS/machine-$cpu.log"
    fi
    # Q4_0/Q8_0 matvec and prompt-tile outputs on seeded data: the sdot kernels must give x86's bits;
    # K-quant products must give them on every path.
    t0=$SECONDS
    if arm "$REPO/bench/arm64/kernel_outputs.py" "$OUT/kernels-$cpu.npz" >>"$LOGS/machine-$cpu.log" 2>&1; then
        verdict=$(cd "$REPO" && "$HOST_PYTHON" bench/arm64/kernel_outputs.py --compare "$OUT/kernels-x86.npz" \
            "$OUT/kernels-$cpu.npz")
        echo "$verdict"
        if [[ $verdict == *'"k_identical": true'* &&
            ($expect != simd-neon-dotprod || $verdict == *'"identical": true'*) ]]; then
            record "$cpu: kernel outputs vs x86" PASS $((SECONDS - t0)) "$verdict"
        else
            record "$cpu: kernel outputs vs x86" FAIL $((SECONDS - t0)) "not bit-identical: $verdict"
        fi
    else
        record "$cpu: kernel outputs vs x86" FAIL $((SECONDS - t0)) "see $LOGS/machine-$cpu.log"
    fi

    # Greedy generation: the arm64 tokens must equal the x86 ones.
    local greedy_types="q4_0 q8_0"
    if ((SMOKE)); then greedy_types=$([[ $cpu == cortex-a76 ]] && echo q4_0); fi
    for q in $greedy_types; do
        say "5b. $cpu: greedy $q"
        t0=$SECONDS
        if arm "$REPO/bench/arm64/greedy.py" "$WORK/models/tiny-$q.gguf" "$N_TOKENS" "$OUT/arm64-$cpu-$q.npy" \
            >"$OUT/arm64-$cpu-$q.json" 2>"$LOGS/greedy-$cpu-$q.log"; then
            verdict=$("$HOST_PYTHON" - "$OUT/x86-$q" "$OUT/arm64-$cpu-$q" <<'PY'
import json
import sys

import numpy as np

x86, arm = (json.load(open(p + ".json")) for p in sys.argv[1:3])
lx, la = (np.load(p + ".npy") for p in sys.argv[1:3])
print(f"x86   ({x86['kernels']}): {x86['tokens']}", file=sys.stderr)
print(f"arm64 ({arm['kernels']}): {arm['tokens']}", file=sys.stderr)
diff = float(np.max(np.abs(lx - la)) / max(1e-30, float(np.max(np.abs(lx)))))
same = x86["tokens"] == arm["tokens"] and x86["prompt_argmax"] == arm["prompt_argmax"]
print(f"{'same' if same else 'DIFFERENT'} tokens; prompt logits max |diff| / max |logit| = {diff:.1e}")
PY
)
            cat "$OUT/arm64-$cpu-$q.json"
            if [[ $verdict == same* ]]; then
                record "$cpu: greedy $q x86 == arm64" PASS $((SECONDS - t0)) "$verdict"
            else
                record "$cpu: greedy $q x86 == arm64" FAIL $((SECONDS - t0)) "$verdict"
            fi
        else
            record "$cpu: greedy $q x86 == arm64" FAIL $((SECONDS - t0)) "see $LOGS/greedy-$cpu-$q.log"
        fi
    done

    if ((SMOKE)); then unset QEMU_CPU; return 0; fi
    say "5c. $cpu: tests: $cpu_tests"
    t0=$SECONDS
    tests=$(for t in $cpu_tests; do printf '%s ' "$REPO/$t"; done)
    deselect=$(for t in $KNOWN $SLOW; do printf -- '--deselect %s ' "$t"; done)
    # shellcheck disable=SC2086
    arm_cmd timeout "$TEST_TIMEOUT" "${PY_ARM[@]}" -m pytest -p no:xdist -p no:cacheprovider -q -o addopts= \
        --rootdir "$REPO" -c "$REPO/pyproject.toml" $deselect $tests >"$LOGS/pytest-$cpu.log" 2>&1
    rc=$?
    line=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$LOGS/pytest-$cpu.log" | tail -1 | tr -d '=')
    tail -3 "$LOGS/pytest-$cpu.log"
    if ((rc == 0)); then
        record "$cpu: pytest" PASS $((SECONDS - t0)) "$line"
    else
        record "$cpu: pytest" FAIL $((SECONDS - t0)) "${line:-rc=$rc} (see $LOGS/pytest-$cpu.log)"
    fi
    t0=$SECONDS
    if [[ $cpu_tests == *test_quants.py* ]]; then
        known=$(for t in $KNOWN; do printf '%s ' "$REPO/$t"; done)
        # shellcheck disable=SC2086
        arm_cmd timeout "$TEST_TIMEOUT" "${PY_ARM[@]}" -m pytest -p no:xdist -p no:cacheprovider -q -o addopts= \
            --rootdir "$REPO" -c "$REPO/pyproject.toml" $known >"$LOGS/pytest-known-$cpu.log" 2>&1
        line=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$LOGS/pytest-known-$cpu.log" | tail -1 | tr -d '=')
        record "$cpu: known NaN-bit differences" INFO $((SECONDS - t0)) "${line:-?} (see $LOGS/pytest-known-$cpu.log)"
    fi
    unset QEMU_CPU
}

run_cpu cortex-a76 simd-neon-dotprod "$TESTS"
run_cpu cortex-a72 simd-generic "$TESTS_A72"

finish
