"""GGUF reading and writing: round trips against the reference `gguf` package, writer
atomicity, llama.cpp's vocab files, every kind of bad input (each must give one clean
``HalfbyteError`` naming the file, never a traceback or a huge allocation), fuzzing,
and `halfbyte quantize`.

Hand-made files are built with ``struct`` (``pack_gguf`` and friends below) so each bad
case is exactly the bytes it claims to be.
"""

from __future__ import annotations

import math
import mmap
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cli import main as halfbyte_cli
from engine.describe import describe
from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile, GGUFWriter

REPO = Path(__file__).resolve().parents[1]
VOCAB_DIR = REPO.parent / "shared" / "fixtures" / "vocab"
VOCAB_FILES = {name: VOCAB_DIR / f"ggml-vocab-{name}.gguf" for name in ("falcon", "gpt-neox", "llama-spm", "mpt")}

# struct formats of the fixed-size metadata value types
SCALAR_FORMATS = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
NUMPY_DTYPES = {
    VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16, VT.UINT32: np.uint32,
    VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_, VT.UINT64: np.uint64, VT.INT64: np.int64,
    VT.FLOAT64: np.float64,
}


# -- building GGUF bytes by hand ------------------------------------------------------------------


def pack_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def pack_kv(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    """One metadata entry; ``payload`` is the already-encoded value."""
    return pack_string(key) + struct.pack("<I", value_type) + payload


def pack_scalar_kv(key: str, value_type: VT, value: Any) -> bytes:
    return pack_kv(key, value_type, struct.pack(SCALAR_FORMATS[value_type], value))


def pack_array_kv(key: str, elem_type: int, count: int, elements: bytes = b"") -> bytes:
    """An array entry whose declared ``count`` need not match ``elements`` (for lying files)."""
    return pack_kv(key, VT.ARRAY, struct.pack("<IQ", elem_type, count) + elements)


def pack_tensor_info(name: str | bytes, ne: Sequence[int], ggml_type: int, offset: int,
                     n_dims: int | None = None) -> bytes:
    """One tensor info; ``ne`` in ggml order (ne[0] = row length)."""
    n_dims = len(ne) if n_dims is None else n_dims
    return pack_string(name) + struct.pack(f"<I{len(ne)}QIQ", n_dims, *ne, ggml_type, offset)


def pack_gguf(kvs: Sequence[bytes] = (), infos: Sequence[bytes] = (), data: bytes = b"", *, version: int = 3,
              n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32) -> bytes:
    """A whole file. Counts default to the real ones; header is padded to ``alignment`` when tensors follow."""
    header = b"GGUF" + struct.pack(
        "<IQQ", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    ) + b"".join(kvs) + b"".join(infos)
    if infos or data:
        header += b"\0" * (-len(header) % alignment)
    return header + data


def f32_bytes(n: int, start: float = 0.0) -> bytes:
    return np.arange(start, start + n, dtype=np.float32).tobytes()


# -- small helpers --------------------------------------------------------------------------------


def write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def open_error(path: Path) -> str:
    """Open ``path`` expecting a clean one-line HalfbyteError that starts with the path; return the reason."""
    with pytest.raises(HalfbyteError) as exc_info:
        GGUFFile(path)
    message = str(exc_info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    return message[len(f"{path}: ") :]


def run_halfbyte(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def assert_one_line_error(stderr: str, prefix: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert stderr.startswith(f"halfbyte: error: {prefix}"), stderr


def invoke_cli(*args: str) -> Any:
    """`halfbyte ARGS` in-process; returns click's Result (stdout/stderr separate)."""
    return CliRunner().invoke(halfbyte_cli, list(args), catch_exceptions=False)


def touch_everything(gguf_file: GGUFFile) -> None:
    """Read every metadata value and every byte of every tensor view, as a model load would."""
    for key, value in gguf_file.metadata.items():
        repr(key), repr(value)
    for name, info in gguf_file.tensors.items():
        assert info.offset % gguf_file.alignment == 0
        assert info.offset + info.nbytes <= gguf_file.file_size
        view = gguf_file.tensor_array(name)
        raw = gguf_file.tensor_bytes(name)
        assert raw.nbytes == info.nbytes
        assert view.nbytes == info.nbytes
        raw.tobytes()
        del view, raw
    describe(gguf_file)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- a file holding every metadata type and several tensors --------------------------------------

NON_ASCII = "héllo wörld ✓ 日本語 🦙"

# (key, value, value type, element type)
ALL_METADATA: list[tuple[str, Any, VT, VT | None]] = [
    ("general.architecture", "llama", VT.STRING, None),
    ("test.u8", 255, VT.UINT8, None),
    ("test.i8", -128, VT.INT8, None),
    ("test.u16", 65535, VT.UINT16, None),
    ("test.i16", -32768, VT.INT16, None),
    ("test.u32", 2**32 - 1, VT.UINT32, None),
    ("test.i32", -(2**31), VT.INT32, None),
    ("test.u64", 2**64 - 1, VT.UINT64, None),
    ("test.i64", -(2**63), VT.INT64, None),
    ("test.f32", -1.15625, VT.FLOAT32, None),
    ("test.f32_inexact", 0.1, VT.FLOAT32, None),
    ("test.f64", math.pi, VT.FLOAT64, None),
    ("test.bool_true", True, VT.BOOL, None),
    ("test.bool_false", False, VT.BOOL, None),
    ("test.string", NON_ASCII, VT.STRING, None),
    ("test.empty_string", "", VT.STRING, None),
    ("test.ключ", "non-ASCII key", VT.STRING, None),
    ("test.arr.u8", [0, 1, 255], VT.ARRAY, VT.UINT8),
    ("test.arr.i8", [-128, 0, 127], VT.ARRAY, VT.INT8),
    ("test.arr.u16", [0, 65535], VT.ARRAY, VT.UINT16),
    ("test.arr.i16", [-32768, 32767], VT.ARRAY, VT.INT16),
    ("test.arr.u32", [0, 2**32 - 1, 7], VT.ARRAY, VT.UINT32),
    ("test.arr.i32", [-(2**31), 2**31 - 1], VT.ARRAY, VT.INT32),
    ("test.arr.u64", [0, 2**64 - 1], VT.ARRAY, VT.UINT64),
    ("test.arr.i64", [-(2**63), 2**63 - 1], VT.ARRAY, VT.INT64),
    ("test.arr.f32", [0.5, -2.25, 0.1, float("inf")], VT.ARRAY, VT.FLOAT32),
    ("test.arr.f64", [math.e, -0.0, 1e300], VT.ARRAY, VT.FLOAT64),
    ("test.arr.bool", [True, False, True], VT.ARRAY, VT.BOOL),
    ("test.arr.string", ["a", "", NON_ASCII, "▁token", "<0x0A>"], VT.ARRAY, VT.STRING),
    ("test.arr.empty_u8", [], VT.ARRAY, VT.UINT8),
    ("test.arr.empty_f32", np.zeros(0, dtype=np.float32), VT.ARRAY, VT.FLOAT32),
    ("test.arr.empty_string", [], VT.ARRAY, VT.STRING),
]


def make_tensors(seed: int = 0) -> dict[str, tuple[QT, tuple[int, ...], np.ndarray]]:
    """name -> (stored type, numpy-order shape, stored bytes as an array): 1-D to 4-D, F32/F16/Q8_0/Q4_0."""
    rng = np.random.default_rng(seed)

    def floats(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "f32.1d": (QT.F32, (7,), floats(7)),
        "f16.2d": (QT.F16, (3, 5), floats(3, 5).astype(np.float16)),
        "q8_0.3d": (QT.Q8_0, (2, 3, 64), gguf.quants.quantize(floats(2, 3, 64), QT.Q8_0)),
        "q4_0.4d": (QT.Q4_0, (2, 1, 2, 32), gguf.quants.quantize(floats(2, 1, 2, 32), QT.Q4_0)),
        "f32.4d": (QT.F32, (1, 2, 3, 4), floats(1, 2, 3, 4)),
        "q4_0.1d": (QT.Q4_0, (64,), gguf.quants.quantize(floats(64), QT.Q4_0)),
    }


def write_with_halfbyte(path: Path, alignment: int = 32, metadata: Sequence[tuple] = ALL_METADATA,
                        tensors: dict | None = None) -> Path:
    tensors = make_tensors() if tensors is None else tensors
    with GGUFWriter(path, alignment=alignment) as writer:
        for key, value, value_type, elem_type in metadata:
            writer.add(key, value, value_type, elem_type)
        for name, (ggml_type, shape, _) in tensors.items():
            writer.add_tensor_info(name, shape, ggml_type)
        for name, (_, _, stored) in tensors.items():
            if stored.ndim > 1:
                # Stream big-ish tensors in row chunks, as the converters do.
                writer.write_tensor(name, (stored[i : i + 1] for i in range(stored.shape[0])))
            else:
                writer.write_tensor(name, stored)
        writer.finish()
    return path


def expected_numpy(value: Any, elem_type: VT) -> np.ndarray:
    return np.asarray(value, dtype=NUMPY_DTYPES[elem_type])


def assert_metadata_equal(gguf_file: GGUFFile, metadata: Sequence[tuple]) -> None:
    assert list(gguf_file.metadata) == [key for key, *_ in metadata]
    for key, value, value_type, elem_type in metadata:
        got = gguf_file.metadata[key]
        assert gguf_file.value_types[key] == (value_type, elem_type), key
        if value_type == VT.ARRAY and elem_type != VT.STRING:
            assert isinstance(got, np.ndarray) and got.dtype == expected_numpy(value, elem_type).dtype, key
            np.testing.assert_array_equal(got, expected_numpy(value, elem_type), err_msg=key)
        elif value_type == VT.FLOAT32:
            assert got == float(np.float32(value)), key
        else:
            assert got == value and type(got) is type(value), key


# -- round trips ----------------------------------------------------------------------------------


def reference_field_value(field: Any) -> tuple[Any, VT, VT | None]:
    """(value, type, element type) of a gguf.GGUFReader field."""
    value_type = field.types[0]
    if value_type != VT.ARRAY:
        return field.contents(), value_type, None
    elem_type = VT(int(field.parts[3][0]))  # parts: key length, key, value type, element type, count, ...
    return field.contents(), value_type, elem_type


def test_halfbyte_writer_is_read_identically_by_gguf_reader(tmp_path: Path) -> None:
    path = write_with_halfbyte(tmp_path / "all.gguf")
    reader = gguf.GGUFReader(path)
    fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert list(fields) == [key for key, *_ in ALL_METADATA]
    for key, value, value_type, elem_type in ALL_METADATA:
        got, got_type, got_elem = reference_field_value(fields[key])
        assert (got_type, got_elem) == (value_type, elem_type), key
        if value_type == VT.ARRAY and elem_type != VT.STRING:
            assert got == expected_numpy(value, elem_type).tolist(), key
        elif value_type == VT.FLOAT32:
            assert got == float(np.float32(value)), key
        else:
            assert got == value, key

    tensors = make_tensors()
    assert [t.name for t in reader.tensors] == list(tensors)
    for tensor in reader.tensors:
        ggml_type, shape, stored = tensors[tensor.name]
        assert tensor.tensor_type == ggml_type
        assert tuple(int(d) for d in tensor.shape) == tuple(reversed(shape))  # ggml order
        assert tensor.data.tobytes() == stored.tobytes(), tensor.name
        assert tensor.data_offset % 32 == 0


def test_halfbyte_writer_is_read_identically_by_halfbyte(tmp_path: Path) -> None:
    path = write_with_halfbyte(tmp_path / "all.gguf")
    with GGUFFile(path) as gguf_file:
        assert gguf_file.version == 3 and gguf_file.alignment == 32
        assert_metadata_equal(gguf_file, ALL_METADATA)
        tensors = make_tensors()
        assert list(gguf_file.tensors) == list(tensors)
        for name, (ggml_type, shape, stored) in tensors.items():
            info = gguf_file.tensors[name]
            assert info.ggml_type == ggml_type and info.shape == shape
            assert gguf_file.tensor_bytes(name).tobytes() == stored.tobytes()
            view = gguf_file.tensor_array(name)
            if ggml_type in (QT.F32, QT.F16):
                assert view.shape == shape and view.dtype == stored.dtype
                np.testing.assert_array_equal(view, stored)
            else:
                assert view.shape == stored.shape and view.dtype == np.uint8  # rows of block bytes
                np.testing.assert_array_equal(view, stored)


def write_with_reference_writer(path: Path, alignment: int | None = 64) -> dict[str, tuple[QT, np.ndarray]]:
    """A file from gguf-py's own writer; returns name -> (type, stored array)."""
    writer = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, value_type, elem_type in ALL_METADATA:
        if key == "general.architecture" or (value_type == VT.ARRAY and len(value) == 0):
            continue  # gguf-py adds the architecture itself and cannot write empty arrays
        if value_type == VT.STRING and not value:
            continue  # gguf-py drops empty strings
        writer.add_key_value(key, list(value) if value_type == VT.ARRAY else value, value_type, elem_type)
    rng = np.random.default_rng(1)
    stored = {
        "a.f32": (QT.F32, rng.standard_normal((3, 7)).astype(np.float32)),
        "b.f16": (QT.F16, rng.standard_normal(5).astype(np.float16)),
        "c.q8_0": (QT.Q8_0, gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), QT.Q8_0)),
        "d.q4_0": (QT.Q4_0, gguf.quants.quantize(rng.standard_normal((2, 2, 32)).astype(np.float32), QT.Q4_0)),
        "e.i32": (QT.I32, np.arange(6, dtype=np.int32).reshape(2, 3)),
    }
    for name, (ggml_type, array) in stored.items():
        writer.add_tensor(name, array, raw_dtype=ggml_type if array.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_reference_writer_files_are_read_identically(tmp_path: Path) -> None:
    path = tmp_path / "ref.gguf"
    stored = write_with_reference_writer(path, alignment=64)
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as gguf_file:
        assert gguf_file.alignment == 64
        assert gguf_file.metadata["general.alignment"] == 64
        assert gguf_file.value_types["general.alignment"] == (VT.UINT32, None)
        assert gguf_file.data_offset == reader.data_offset
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            value, value_type, elem_type = reference_field_value(field)
            assert gguf_file.value_types[name] == (value_type, elem_type), name
            got = gguf_file.metadata[name]
            assert (got.tolist() if isinstance(got, np.ndarray) else got) == value, name
        assert list(gguf_file.tensors) == [t.name for t in reader.tensors]
        for tensor in reader.tensors:
            info = gguf_file.tensors[tensor.name]
            ggml_type, array = stored[tensor.name]
            assert info.ggml_type == tensor.tensor_type == ggml_type
            assert info.offset == tensor.data_offset and info.offset % 64 == 0
            assert info.ne == tuple(int(d) for d in tensor.shape)
            np.testing.assert_array_equal(gguf_file.tensor_array(tensor.name), array)
            assert gguf_file.tensor_bytes(tensor.name).tobytes() == tensor.data.tobytes()


@pytest.mark.parametrize("alignment", [1, 8, 64, 256, 4096])
def test_custom_alignment_round_trip(tmp_path: Path, alignment: int) -> None:
    # Odd-sized tensors (12, 10, 34 bytes) so that every padding rule matters.
    tensors = {
        "odd.f32": (QT.F32, (3,), np.array([1, 2, 3], dtype=np.float32)),
        "odd.f16": (QT.F16, (5,), np.arange(5, dtype=np.float16)),
        "odd.q8_0": (QT.Q8_0, (32,), gguf.quants.quantize(np.linspace(-1, 1, 32, dtype=np.float32), QT.Q8_0)),
        "last.f32": (QT.F32, (1,), np.array([7], dtype=np.float32)),
    }
    metadata = [("general.architecture", "llama", VT.STRING, None)]
    path = write_with_halfbyte(tmp_path / "aligned.gguf", alignment, metadata, tensors)
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as gguf_file:
        assert gguf_file.alignment == alignment
        assert gguf_file.data_offset % alignment == 0 and gguf_file.data_offset == reader.data_offset
        if alignment != 32:
            assert gguf_file.metadata["general.alignment"] == alignment
        for tensor in reader.tensors:
            info = gguf_file.tensors[tensor.name]
            assert info.offset == tensor.data_offset and info.offset % alignment == 0
            assert gguf_file.tensor_bytes(tensor.name).tobytes() == tensors[tensor.name][2].tobytes()
            assert tensor.data.tobytes() == tensors[tensor.name][2].tobytes()


def test_tensor_views_are_zero_copy(tmp_path: Path) -> None:
    path = write_with_halfbyte(tmp_path / "all.gguf")
    with GGUFFile(path) as gguf_file:
        for name in gguf_file.tensors:
            view = gguf_file.tensor_array(name)
            assert not view.flags.owndata and not view.flags.writeable
            assert np.shares_memory(view, gguf_file.tensor_bytes(name))
            base = view
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            if isinstance(base, memoryview):
                base = base.obj
            assert isinstance(base, mmap.mmap), type(base)  # the file's map itself, not a copy


def write_sparse_gguf(path: Path, n_floats: int, kvs: Sequence[bytes] = ()) -> Path:
    """A file with one F32 tensor of ``n_floats`` elements whose data is a hole (no disk, no page cache)."""
    header = pack_gguf(kvs, [pack_tensor_info("huge", [n_floats], QT.F32, 0)])
    with open(path, "wb") as out:
        out.write(header)
        out.truncate(len(header) + 4 * n_floats)
    return path


def test_open_of_a_1gb_tensor_is_fast_and_maps_nothing_in(tmp_path: Path) -> None:
    path = write_sparse_gguf(tmp_path / "huge.gguf", n_floats=2**28)  # 1 GiB of F32
    assert path.stat().st_size > 2**30
    rss_before = rss_bytes()
    open_times = []
    for _ in range(5):
        start = time.perf_counter()
        with GGUFFile(path) as gguf_file:
            view = gguf_file.tensor_array("huge")
            open_times.append(time.perf_counter() - start)
            assert view.shape == (2**28,) and not view.flags.owndata
            assert float(view[12345]) == 0.0 and float(view[-1]) == 0.0  # touches two pages only
            del view
    rss_growth = rss_bytes() - rss_before
    # Copying or reading 1 GiB would take ~0.5 s and grow RSS by 1 GiB; mapping takes well under 10 ms.
    assert sorted(open_times)[2] < 0.1, open_times
    assert rss_growth < 16 * 2**20, rss_growth


# -- writer atomicity -----------------------------------------------------------------------------


class WriterTestFailure(Exception):
    pass


def failing_chunks(first: bytes, exc: BaseException) -> Iterator[bytes]:
    yield first
    raise exc


@pytest.mark.parametrize("exc", [WriterTestFailure("disk on fire"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("pre_existing", [False, True], ids=["new", "overwrite"])
def test_writer_failure_leaves_no_file_and_keeps_the_old_one(
    tmp_path: Path, exc: BaseException, pre_existing: bool
) -> None:
    target = tmp_path / "model.gguf"
    if pre_existing:
        target.write_bytes(b"the previous, good model")
    with pytest.raises(type(exc)):
        with GGUFWriter(target) as writer:
            writer.add_string("general.architecture", "llama")
            writer.add_tensor_info("a", (4, 8), QT.F32)
            writer.add_tensor_info("b", (8,), QT.F32)
            writer.write_tensor("a", failing_chunks(f32_bytes(8), exc))
    if pre_existing:
        assert target.read_bytes() == b"the previous, good model"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_writer_leaves_no_partial_file_on_success(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    write_with_halfbyte(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    with GGUFFile(target) as gguf_file:
        assert len(gguf_file.tensors) == len(make_tensors())


def declare_two_tensors(writer: GGUFWriter) -> None:
    writer.add_tensor_info("first", (2, 4), QT.F32)  # 32 bytes
    writer.add_tensor_info("second", (4,), QT.F32)  # 16 bytes


@pytest.mark.parametrize(
    "misuse",
    [
        pytest.param(lambda w: w.write_tensor("first", f32_bytes(7)), id="too-few-bytes"),
        pytest.param(lambda w: w.write_tensor("first", f32_bytes(9)), id="too-many-bytes"),
        pytest.param(lambda w: w.write_tensor("first", [f32_bytes(4), f32_bytes(4), f32_bytes(1)]),
                     id="too-many-bytes-chunked"),
        pytest.param(lambda w: w.write_tensor("second", f32_bytes(4)), id="out-of-order"),
        pytest.param(lambda w: w.write_tensor("third", f32_bytes(4)), id="undeclared"),
        pytest.param(lambda w: (w.write_tensor("first", f32_bytes(8)), w.finish()), id="finish-too-early"),
        pytest.param(lambda w: w.add_tensor_info("first", (4,), QT.F32), id="duplicate-name"),
    ],
)
def test_writer_misuse_raises_and_leaves_nothing(tmp_path: Path, misuse: Callable[[GGUFWriter], Any]) -> None:
    target = tmp_path / "model.gguf"
    with pytest.raises((RuntimeError, ValueError)):
        with GGUFWriter(target) as writer:
            declare_two_tensors(writer)
            misuse(writer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("alignment", [0, 3, 48, -32, 2**32])
def test_writer_refuses_alignments_no_reader_accepts(tmp_path: Path, alignment: int) -> None:
    with pytest.raises(ValueError, match="alignment"):
        GGUFWriter(tmp_path / "model.gguf", alignment=alignment)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_rows_that_do_not_split_into_blocks(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    with pytest.raises(HalfbyteError) as exc_info:
        with GGUFWriter(target) as writer:
            writer.add_tensor_info("bad", (2, 33), QT.Q4_0)
    assert str(exc_info.value).startswith(f"{target}: ")
    assert list(tmp_path.iterdir()) == []


# -- llama.cpp's vocab files ----------------------------------------------------------------------

# name -> architecture, tokenizer model, pre-tokenizer, vocab size, merges, special ids
VOCAB_EXPECTED: dict[str, dict[str, Any]] = {
    "falcon": dict(arch="falcon", model="gpt2", pre="falcon", n_vocab=65024, n_merges=64784,
                   special={"bos": (11, "<|endoftext|>"), "eos": (11, "<|endoftext|>")}),
    "gpt-neox": dict(arch="gptneox", model="gpt2", pre=None, n_vocab=50432, n_merges=50009,
                     special={"bos": (0, "<|endoftext|>"), "eos": (0, "<|endoftext|>"),
                              "unknown": (0, "<|endoftext|>")}),
    "llama-spm": dict(arch="llama", model="llama", pre="default", n_vocab=32000, n_merges=None,
                      special={"bos": (1, "<s>"), "eos": (2, "</s>"), "unknown": (0, "<unk>")}),
    "mpt": dict(arch="mpt", model="gpt2", pre="mpt", n_vocab=50432, n_merges=50009,
                special={"bos": (0, "<|endoftext|>"), "eos": (0, "<|endoftext|>"),
                         "unknown": (0, "<|endoftext|>")}),
}


@pytest.mark.parametrize("name", list(VOCAB_FILES))
def test_vocab_fixture_opens_with_expected_keys(name: str) -> None:
    expected = VOCAB_EXPECTED[name]
    with GGUFFile(VOCAB_FILES[name]) as vocab:
        assert vocab.version == 3 and not vocab.tensors
        assert vocab.architecture == expected["arch"]
        assert vocab.metadata["tokenizer.ggml.model"] == expected["model"]
        assert vocab.metadata.get("tokenizer.ggml.pre") == expected["pre"]
        tokens = vocab.metadata["tokenizer.ggml.tokens"]
        assert vocab.value_types["tokenizer.ggml.tokens"] == (VT.ARRAY, VT.STRING)
        assert len(tokens) == expected["n_vocab"] and all(isinstance(t, str) for t in tokens)
        token_types = vocab.metadata["tokenizer.ggml.token_type"]
        assert token_types.dtype == np.int32 and len(token_types) == expected["n_vocab"]
        if expected["n_merges"] is not None:
            assert len(vocab.metadata["tokenizer.ggml.merges"]) == expected["n_merges"]
        else:
            scores = vocab.metadata["tokenizer.ggml.scores"]
            assert scores.dtype == np.float32 and len(scores) == expected["n_vocab"]
        for special, (token_id, piece) in expected["special"].items():
            assert vocab.metadata[f"tokenizer.ggml.{special}_token_id"] == token_id
            assert tokens[token_id] == piece
        assert vocab.value_types["tokenizer.ggml.bos_token_id"] == (VT.UINT32, None)


def test_vocab_fixture_metadata_matches_gguf_reader() -> None:
    # One full cross-check against the reference reader (the smallest file: gguf-py is slow on big vocabs).
    path = VOCAB_FILES["llama-spm"]
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as vocab:
        fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        assert list(fields) == list(vocab.metadata)
        for key, field in fields.items():
            value, value_type, elem_type = reference_field_value(field)
            assert vocab.value_types[key] == (value_type, elem_type), key
            got = vocab.metadata[key]
            assert (got.tolist() if isinstance(got, np.ndarray) else got) == value, key


@pytest.mark.parametrize("name", list(VOCAB_FILES))
def test_info_command_on_vocab_fixture(name: str) -> None:
    expected = VOCAB_EXPECTED[name]
    result = invoke_cli("info", str(VOCAB_FILES[name]))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"architecture: {expected['arch']}" in lines
    assert f"  model:      {expected['model']}" in lines
    assert f"  vocab size: {expected['n_vocab']}" in lines
    if expected["pre"] is not None:
        assert f"  pre:        {expected['pre']}" in lines
    for special, (token_id, piece) in expected["special"].items():
        assert f"  {special + ' id:':11} {token_id} {piece!r}" in lines
    assert "tensors: 0" in lines


def test_info_shows_mistyped_keys_instead_of_crashing(tmp_path: Path) -> None:
    # A valid GGUF whose well-known keys have the wrong types: `info` is the tool to diagnose it.
    path = write_file(tmp_path / "mistyped.gguf", pack_gguf([
        pack_scalar_kv("general.architecture", VT.UINT32, 7),
        pack_scalar_kv("7.block_count", VT.UINT32, 2),
        pack_kv("general.file_type", VT.STRING, pack_string("q4_0")),
        pack_kv("tokenizer.ggml.model", VT.STRING, pack_string("llama")),
        pack_scalar_kv("tokenizer.ggml.tokens", VT.UINT32, 3),
        pack_scalar_kv("tokenizer.ggml.merges", VT.UINT8, 1),
        pack_kv("tokenizer.ggml.token_type", VT.STRING, pack_string("normal")),
        pack_kv("tokenizer.ggml.bos_token_id", VT.STRING, pack_string("<s>")),
        pack_scalar_kv("tokenizer.ggml.eos_token_id", VT.FLOAT32, 2.0),
        pack_scalar_kv("tokenizer.ggml.unknown_token_id", VT.INT32, -1),
    ]))
    result = invoke_cli("info", str(path))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "architecture: 7" in lines and "file type:    'q4_0'" in lines
    assert "  bos id:     '<s>' <not an integer>" in lines
    assert "  unknown id: -1 '<out of range>'" in lines


def test_info_on_invalid_utf8_with_a_strict_utf8_stdout(tmp_path: Path) -> None:
    # Invalid UTF-8 is kept (surrogateescape) so files round-trip; printing it must not crash.
    path = write_file(tmp_path / "bad-utf8.gguf", pack_gguf([
        pack_kv("general.architecture", VT.STRING, pack_string(b"ll\xffama")),
        pack_kv(b"general.\xfe", VT.STRING, pack_string(b"v\x80")),
        pack_kv("tokenizer.ggml.model", VT.STRING, pack_string(b"gpt\xff")),
        pack_array_kv("tokenizer.ggml.tokens", VT.STRING, 2, pack_string(b"\xff") + pack_string("a")),
        pack_scalar_kv("tokenizer.ggml.bos_token_id", VT.UINT32, 0),
    ]))
    with GGUFFile(path) as gguf_file:
        assert gguf_file.architecture.encode("utf-8", "surrogateescape") == b"ll\xffama"
    result = subprocess.run([sys.executable, "-m", "engine", "info", str(path)], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "architecture: ll\\xffama" in result.stdout.splitlines()


def test_info_command_as_a_real_process() -> None:
    result = run_halfbyte("info", str(VOCAB_FILES["falcon"]))
    assert result.returncode == 0, result.stderr
    assert "architecture: falcon" in result.stdout.splitlines()
    assert "  vocab size: 65024" in result.stdout.splitlines()
    assert "  bos id:     11 '<|endoftext|>'" in result.stdout.splitlines()


# -- bad input: every case is one clean HalfbyteError naming the file ------------------------------

ONE_TENSOR_INFO = [pack_tensor_info("t", [8], QT.F32, 0)]
EIGHT_FLOATS = f32_bytes(8)  # 32 bytes: exactly one aligned slot, no trailing padding


def alignment_kv(value_type: VT, value: Any) -> bytes:
    if value_type == VT.STRING:
        return pack_kv("general.alignment", VT.STRING, pack_string(value))
    return pack_scalar_kv("general.alignment", value_type, value)


# id -> (file bytes, a fragment the message must contain)
BAD_FILES: dict[str, tuple[bytes, str]] = {
    "text-file": (b"This is not a model, just some text.\n", "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
    "3-bytes": (b"GGU", "not a GGUF file"),
    "magic-only": (b"GGUF", "truncated"),
    "ggml-magic": (b"lmgg" + b"\0" * 100, "not a GGUF file"),
    "version-0": (pack_gguf(version=0), "version 0"),
    "version-1": (pack_gguf(version=1), "version 1"),
    "version-4": (pack_gguf(version=4), "version 4"),
    "version-max": (pack_gguf(version=0xFFFFFFFF), "version 4294967295"),
    "big-endian-v3": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "big-endian-v2": (b"GGUF" + struct.pack(">IQQ", 2, 1, 1) + b"\0" * 64, "big-endian"),
    "header-cut": (pack_gguf()[:20], "truncated"),
    "unknown-value-type-13": (pack_gguf([pack_kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    "unknown-value-type-max": (pack_gguf([pack_kv("k", 0xFFFFFFFF, b"\0" * 8)]), "unknown value type"),
    "unknown-array-elem-type": (pack_gguf([pack_array_kv("k", 99, 1, b"\0" * 8)]), "unknown value type 99"),
    "bool-array-count-lies": (pack_gguf([pack_array_kv("k", VT.BOOL, 100, b"\1" * 10)]), "runs past the end"),
    "unknown-tensor-type-99": (pack_gguf(infos=[pack_tensor_info("t", [8], 99, 0)], data=EIGHT_FLOATS),
                               "unknown type 99"),
    "removed-tensor-type-q4_2": (pack_gguf(infos=[pack_tensor_info("t", [32], 4, 0)], data=b"\0" * 32),
                                 "unknown type 4"),
    "tensor-past-end": (pack_gguf(infos=[pack_tensor_info("t", [9], QT.F32, 0)], data=EIGHT_FLOATS),
                        "runs past the end"),
    "tensor-offset-past-end": (pack_gguf(infos=[pack_tensor_info("t", [8], QT.F32, 2**20)], data=EIGHT_FLOATS),
                               "runs past the end"),
    "tensor-offset-wraps": (pack_gguf(infos=[pack_tensor_info("t", [8], QT.F32, 2**64 - 32)], data=EIGHT_FLOATS),
                            "runs past the end"),
    "no-tensor-data-at-all": (pack_gguf(infos=ONE_TENSOR_INFO), "runs past the end"),
    "overlapping-tensors": (
        pack_gguf(infos=[pack_tensor_info("a", [16], QT.F32, 0), pack_tensor_info("b", [16], QT.F32, 32)],
                  data=f32_bytes(24)),
        "overlap",
    ),
    "same-offset-tensors": (
        pack_gguf(infos=[pack_tensor_info("a", [8], QT.F32, 0), pack_tensor_info("b", [8], QT.F32, 0)],
                  data=EIGHT_FLOATS),
        "overlap",
    ),
    "misaligned-offset": (pack_gguf(infos=[pack_tensor_info("t", [4], QT.F32, 4)], data=EIGHT_FLOATS),
                          "not aligned"),
    "n-dims-5": (pack_gguf(infos=[pack_tensor_info("t", [1, 1, 1, 1, 8], QT.F32, 0)], data=EIGHT_FLOATS),
                 "5 dimensions"),
    "n-dims-max": (pack_gguf(infos=[pack_tensor_info("t", [8], QT.F32, 0, n_dims=0xFFFFFFFF)], data=EIGHT_FLOATS),
                   "dimensions"),
    "duplicate-key": (pack_gguf([pack_scalar_kv("k", VT.UINT32, 1), pack_scalar_kv("k", VT.UINT32, 2)]),
                      "duplicate metadata key 'k'"),
    "duplicate-tensor": (
        pack_gguf(infos=[pack_tensor_info("t", [4], QT.F32, 0), pack_tensor_info("t", [4], QT.F32, 32)],
                  data=f32_bytes(16)),
        "duplicate tensor name 't'",
    ),
    "row-not-multiple-of-block": (pack_gguf(infos=[pack_tensor_info("t", [33], QT.Q4_0, 0)], data=b"\0" * 64),
                                  "not a multiple of the Q4_0 block size 32"),
    "q8_0-row-of-16": (pack_gguf(infos=[pack_tensor_info("t", [16, 4], QT.Q8_0, 0)], data=b"\0" * 160),
                       "block size 32"),
    "quantized-scalar": (pack_gguf(infos=[pack_tensor_info("t", [], QT.Q4_0, 0)], data=b"\0" * 32),
                         "block size 32"),
    "alignment-0": (pack_gguf([alignment_kv(VT.UINT32, 0)]), "general.alignment"),
    "alignment-3": (pack_gguf([alignment_kv(VT.UINT32, 3)]), "general.alignment"),
    "alignment-as-u64": (pack_gguf([alignment_kv(VT.UINT64, 32)]), "general.alignment"),
    "alignment-as-i32": (pack_gguf([alignment_kv(VT.INT32, 32)]), "general.alignment"),
    "alignment-as-string": (pack_gguf([alignment_kv(VT.STRING, "32")]), "general.alignment"),
    "arrays-nested-too-deep": (
        pack_gguf([pack_kv("k", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) * 9 + struct.pack("<IQ", VT.UINT8, 0))]),
        "nested deeper",
    ),
}

# Counts and lengths that would allocate petabytes if trusted.
ABSURD_FILES: dict[str, tuple[bytes, str]] = {
    "2^63-tensors": (pack_gguf(n_tensors=2**63), "tensor count"),
    "2^64-1-tensors": (pack_gguf(n_tensors=2**64 - 1), "tensor count"),
    "2^63-kv": (pack_gguf(n_kv=2**63), "metadata count"),
    "2^64-1-kv": (pack_gguf(n_kv=2**64 - 1), "metadata count"),
    "2^40-byte-key": (pack_gguf([struct.pack("<Q", 2**40) + b"key"], n_kv=1) + b"\0" * 64, "runs past the end"),
    "2^64-1-byte-key": (pack_gguf([struct.pack("<Q", 2**64 - 1) + b"key"], n_kv=1) + b"\0" * 64,
                        "runs past the end"),
    "2^40-byte-string-value": (pack_gguf([pack_kv("k", VT.STRING, struct.pack("<Q", 2**40) + b"abc")]),
                               "runs past the end"),
    "2^62-u8-array": (pack_gguf([pack_array_kv("k", VT.UINT8, 2**62, b"\0" * 16)]), "runs past the end"),
    "2^62-u64-array": (pack_gguf([pack_array_kv("k", VT.UINT64, 2**62, b"\0" * 16)]), "runs past the end"),
    "2^61-u64-array": (pack_gguf([pack_array_kv("k", VT.UINT64, 2**61, b"\0" * 16)]), "runs past the end"),
    "2^62-string-array": (pack_gguf([pack_array_kv("k", VT.STRING, 2**62, b"\0" * 16)]), "runs past the end"),
    "2^62-nested-array": (pack_gguf([pack_array_kv("k", VT.ARRAY, 2**62, b"\0" * 16)]), "runs past the end"),
    "2^64-1-string-array": (pack_gguf([pack_array_kv("k", VT.STRING, 2**64 - 1, b"\0" * 16)]), "runs past the end"),
    "string-array-element-2^40": (
        pack_gguf([pack_array_kv("k", VT.STRING, 2, pack_string("ok") + struct.pack("<Q", 2**40) + b"x" * 8)]),
        "runs past the end",
    ),
    "2^40-byte-tensor-name": (
        pack_gguf(infos=[struct.pack("<Q", 2**40) + b"t" * 40], n_tensors=1), "runs past the end"
    ),
    "2^40x2^40-tensor": (pack_gguf(infos=[pack_tensor_info("t", [2**40, 2**40], QT.F32, 0)], data=EIGHT_FLOATS),
                         "tensor 't'"),
    "2^64-1-row-tensor": (pack_gguf(infos=[pack_tensor_info("t", [2**64 - 1], QT.I8, 0)], data=EIGHT_FLOATS),
                          "tensor 't'"),
    "empty-tensor-with-2^63-rows": (
        pack_gguf(infos=[pack_tensor_info("t", [0, 2**63], QT.F32, 0)], data=EIGHT_FLOATS), "tensor 't'"
    ),
    "empty-f32-tensor-with-2^62-rows": (  # 2^62 x 4 bytes overflows numpy even with no data
        pack_gguf(infos=[pack_tensor_info("t", [0, 2**62], QT.F32, 0)], data=EIGHT_FLOATS), "tensor 't'"
    ),
    "empty-tensor-2^40-cubed": (
        pack_gguf(infos=[pack_tensor_info("t", [2**40, 0, 2**40], QT.F32, 0)], data=EIGHT_FLOATS), "tensor 't'"
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES) + list(ABSURD_FILES))
def test_bad_file_gives_one_clean_error(tmp_path: Path, case: str) -> None:
    content, fragment = BAD_FILES[case] if case in BAD_FILES else ABSURD_FILES[case]
    path = write_file(tmp_path / f"{case}.gguf", content)
    message = open_error(path)
    assert fragment in message


@pytest.mark.parametrize("case", list(ABSURD_FILES))
def test_absurd_counts_allocate_nothing_big(tmp_path: Path, case: str) -> None:
    content, _ = ABSURD_FILES[case]
    path = write_file(tmp_path / "absurd.gguf", content)
    tracemalloc.start()
    try:
        open_error(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(content) + 256 * 1024, peak


def test_absurd_counts_under_an_address_space_limit(tmp_path: Path) -> None:
    """In a child capped to its current size + 256 MiB: an untrusted count would die with MemoryError."""
    paths = [str(write_file(tmp_path / f"{case}.gguf", content)) for case, (content, _) in ABSURD_FILES.items()]
    script = textwrap.dedent(
        """
        import resource, sys
        from engine.errors import HalfbyteError
        from engine.gguf_file import GGUFFile

        with open("/proc/self/status") as status:
            vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, ((vm_kib << 10) + (256 << 20), resource.RLIM_INFINITY))
        for path in sys.argv[1:]:
            try:
                GGUFFile(path)
            except HalfbyteError:
                print("clean error")
            else:
                print("opened")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["clean error"] * len(paths)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "no such file" in open_error(tmp_path / "nope.gguf")
    assert "directory" in open_error(tmp_path)


def truncation_source() -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A valid file with every section, and where each section starts and ends.

    Tensor sizes are multiples of the alignment, so the file has no trailing padding and
    *every* strict prefix is missing something the header promises.
    """
    kvs = [
        pack_kv("general.architecture", VT.STRING, pack_string("llama")),
        pack_scalar_kv("llama.block_count", VT.UINT32, 2),
        pack_array_kv("tokenizer.ggml.scores", VT.FLOAT32, 3, np.ones(3, np.float32).tobytes()),
        pack_array_kv("tokenizer.ggml.tokens", VT.STRING, 3, b"".join(map(pack_string, ["<s>", "▁a", "b"]))),
    ]
    infos = [pack_tensor_info("token_embd.weight", [64, 2], QT.Q8_0, 0),  # 136 bytes -> slot of 160
             pack_tensor_info("output_norm.weight", [8], QT.F32, 160)]  # 32 bytes, last
    data = gguf.quants.quantize(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), QT.Q8_0).tobytes()
    data += b"\0" * (160 - len(data)) + EIGHT_FLOATS
    content = pack_gguf(kvs, infos, data)
    kv_end = 24 + sum(map(len, kvs))
    infos_end = kv_end + sum(map(len, infos))
    data_start = len(content) - len(data)
    sections = {"magic": (0, 4), "header": (4, 24), "metadata": (24, kv_end), "tensor infos": (kv_end, infos_end),
                "padding": (infos_end, data_start), "tensor data": (data_start, len(content))}
    return content, sections


def test_every_truncation_is_a_clean_error(tmp_path: Path) -> None:
    content, sections = truncation_source()
    with GGUFFile(write_file(tmp_path / "whole.gguf", content)) as whole:
        touch_everything(whole)
    path = tmp_path / "cut.gguf"
    for section, (start, end) in sections.items():
        for cut in range(start, end):
            message = open_error(write_file(path, content[:cut]))
            if section == "magic":
                assert "not a GGUF file" in message
            elif section in ("padding", "tensor data"):
                assert "runs past the end" in message, (cut, message)
            else:
                assert any(word in message for word in ("truncated", "runs past", "impossible")), (cut, message)


def test_truncated_vocab_fixture_is_a_clean_error(tmp_path: Path) -> None:
    content = VOCAB_FILES["llama-spm"].read_bytes()
    path = tmp_path / "cut.gguf"
    cuts = list(range(0, 600, 7)) + random.Random(0).sample(range(600, len(content)), 40) + [len(content) - 1]
    for cut in cuts:
        open_error(write_file(path, content[:cut]))


@pytest.mark.parametrize("case", ["text-file", "empty", "version-4", "big-endian-v3", "2^63-kv",
                                  "unknown-tensor-type-99", "overlapping-tensors"])
def test_bad_file_through_the_cli(tmp_path: Path, case: str) -> None:
    content, fragment = (BAD_FILES | ABSURD_FILES)[case]
    path = write_file(tmp_path / f"{case}.gguf", content)
    result = invoke_cli("info", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_one_line_error(result.stderr, f"{path}: ")
    assert fragment in result.stderr[len(f"halfbyte: error: {path}: ") :]


def test_bad_file_through_a_real_process(tmp_path: Path) -> None:
    content, _ = truncation_source()
    path = write_file(tmp_path / "cut.gguf", content[:100])
    result = run_halfbyte("info", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert_one_line_error(result.stderr, f"{path}: ")
    missing = run_halfbyte("info", str(tmp_path / "missing.gguf"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


# -- fuzzing --------------------------------------------------------------------------------------


def trimmed_vocab_bytes(tmp_path: Path, n_tokens: int = 16) -> bytes:
    """The llama-spm vocab file with its arrays cut to the first ``n_tokens`` entries."""
    with GGUFFile(VOCAB_FILES["llama-spm"]) as vocab:
        metadata = [
            (key, value[:n_tokens] if isinstance(value, (list, np.ndarray)) else value, *vocab.value_types[key])
            for key, value in vocab.metadata.items()
        ]
    return write_with_halfbyte(tmp_path / "trimmed.gguf", metadata=metadata, tensors={}).read_bytes()


def nested_array_bytes() -> bytes:
    """Array-of-arrays metadata (which gguf-py and our writer never write, but the format allows)."""
    inner = [struct.pack("<IQ", VT.UINT16, 2) + struct.pack("<2H", 1, 2), struct.pack("<IQ", VT.STRING, 1)
             + pack_string("x")]
    kvs = [pack_kv("nested", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 2) + b"".join(inner)),
           pack_scalar_kv("general.alignment", VT.UINT32, 16)]
    return pack_gguf(kvs, [pack_tensor_info("t", [4], QT.F32, 0)], f32_bytes(4), alignment=16)


@pytest.fixture(scope="module")
def fuzz_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    tmp_path = tmp_path_factory.mktemp("seeds")
    small_metadata = [m for m in ALL_METADATA if m[0] in ("general.architecture", "test.u32", "test.f32",
                                                          "test.arr.i32", "test.arr.string", "test.bool_true")]
    tensors = {name: t for name, t in make_tensors().items() if name in ("f16.2d", "q4_0.1d", "q8_0.3d")}
    seeds = [
        write_with_halfbyte(tmp_path / "tensors.gguf", metadata=small_metadata, tensors=tensors).read_bytes(),
        trimmed_vocab_bytes(tmp_path),
        nested_array_bytes(),
    ]
    write_with_reference_writer(tmp_path / "ref.gguf", alignment=64)
    seeds.append((tmp_path / "ref.gguf").read_bytes())
    for seed in seeds:  # every seed is itself valid
        with GGUFFile(write_file(tmp_path / "check.gguf", seed)) as gguf_file:
            touch_everything(gguf_file)
    return seeds


# Values that tend to break parsers: zero, one, powers of two, all ones, negative when signed.
INTERESTING_U64 = [0, 1, 2, 3, 4, 7, 8, 9, 13, 31, 32, 33, 64, 255, 256, 2**16, 2**31, 2**32 - 1, 2**32, 2**40,
                   2**62, 2**63 - 1, 2**63, 2**64 - 32, 2**64 - 1]


def mutate(content: bytes, rng: random.Random) -> bytes:
    """One to three random mutations: bit flips, u64/u32 overwrites, truncation, insertion, deletion."""
    data = bytearray(content)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if not data:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        position = rng.randrange(len(data))
        if kind == 0:
            data[position] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[position] = rng.randrange(256)
        elif kind == 2:  # a count or length field is a u64 at an 8-aligned (or 4-aligned) position
            position -= position % rng.choice((4, 8))
            value = rng.choice(INTERESTING_U64) if rng.random() < 0.7 else rng.getrandbits(64)
            data[position : position + 8] = struct.pack("<Q", value)[: len(data) - position]
        elif kind == 3:  # a type id or n_dims is a u32
            value = rng.choice((0, 1, 4, 5, 8, 9, 12, 13, 30, 31, 39, 99, 2**31, 2**32 - 1))
            data[position : position + 4] = struct.pack("<I", value)[: len(data) - position]
        elif kind == 4:
            del data[position:]
        elif kind == 5:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8, 13))))
        else:
            del data[position : position + rng.choice((1, 4, 8, 16))]
    return bytes(data)


def open_mutant(path: Path, content: bytes) -> str:
    """Open a mutated file: it must open (and then be fully readable) or raise HalfbyteError."""
    # Unlink first: views of the previous mutant may still map the old inode, and truncating a
    # mapped file would turn their next read into SIGBUS.
    path.unlink(missing_ok=True)
    path.write_bytes(content)
    try:
        gguf_file = GGUFFile(path)
    except HalfbyteError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
        return "error"
    with gguf_file:
        touch_everything(gguf_file)
    return "opened"


def test_fuzz_mutated_files(tmp_path: Path, fuzz_seeds: list[bytes]) -> None:
    rng = random.Random(20240611)
    path = tmp_path / "mutant.gguf"
    outcomes = {"error": 0, "opened": 0}
    deadline = time.monotonic() + 15.0
    for case in range(10_000):
        if time.monotonic() > deadline:
            break
        content = mutate(rng.choice(fuzz_seeds), rng)
        try:
            outcomes[open_mutant(path, content)] += 1
        except Exception as exc:  # report the mutant so it can be replayed
            (tmp_path / "failing.gguf").write_bytes(content)
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc} (file {tmp_path / 'failing.gguf'})") \
                from exc
    assert outcomes["error"] > 100 and outcomes["opened"] > 100, outcomes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_hypothesis(tmp_path: Path, fuzz_seeds: list[bytes], data: st.DataObject) -> None:
    seed = bytearray(data.draw(st.sampled_from(fuzz_seeds), label="seed"))
    n_edits = data.draw(st.integers(1, 4), label="n_edits")
    for _ in range(n_edits):
        position = data.draw(st.integers(0, max(0, len(seed) - 1)), label="position")
        kind = data.draw(st.sampled_from(["u64", "u32", "byte", "truncate", "insert"]), label="kind")
        if kind == "u64":
            value = data.draw(st.sampled_from(INTERESTING_U64) | st.integers(0, 2**64 - 1))
            seed[position : position + 8] = struct.pack("<Q", value)[: len(seed) - position]
        elif kind == "u32":
            seed[position : position + 4] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))[
                : len(seed) - position
            ]
        elif kind == "byte":
            if seed:
                seed[position] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del seed[position:]
        else:
            seed[position:position] = data.draw(st.binary(min_size=1, max_size=16))
    open_mutant(tmp_path / "hypothesis.gguf", bytes(seed))


# -- halfbyte quantize ----------------------------------------------------------------------------

QUANTIZE_TARGETS = {"q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1, "q8_0": QT.Q8_0,
                    "f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32}
QUANTIZE_METADATA = [
    ("general.architecture", "llama", VT.STRING, None),
    ("general.name", NON_ASCII, VT.STRING, None),
    ("general.file_type", 1, VT.UINT32, None),
    ("llama.block_count", 1, VT.UINT32, None),
    ("llama.rope.freq_base", 10000.0, VT.FLOAT32, None),
    ("test.u8", 7, VT.UINT8, None),
    ("test.i64", -5, VT.INT64, None),
    ("test.f64", math.e, VT.FLOAT64, None),
    ("test.bool", True, VT.BOOL, None),
    ("tokenizer.ggml.tokens", ["<unk>", "<s>", "▁hé"], VT.ARRAY, VT.STRING),
    ("tokenizer.ggml.scores", [0.0, -1.5, -2.0], VT.ARRAY, VT.FLOAT32),
    ("tokenizer.ggml.token_type", [2, 3, 1], VT.ARRAY, VT.INT32),
]


def bf16_bits(floats: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even, as converters do)."""
    bits = floats.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def quantize_source_tensors() -> dict[str, tuple[QT, tuple[int, ...], np.ndarray]]:
    rng = np.random.default_rng(7)

    def floats(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "token_embd.weight": (QT.F32, (4, 64), floats(4, 64)),
        "blk.0.attn_q.weight": (QT.F16, (3, 64), floats(3, 64).astype(np.float16)),
        "blk.0.ffn_up.weight": (QT.BF16, (2, 96), bf16_bits(floats(2, 96))),
        "blk.0.attn_k.weight": (QT.F32, (2, 2, 32), floats(2, 2, 32)),  # 3-D: still quantized
        "blk.0.odd_rows.weight": (QT.F32, (2, 48), floats(2, 48)),  # rows do not split into 32-blocks
        "blk.0.attn_norm.weight": (QT.F32, (64,), floats(64)),
        "blk.0.ffn_norm.weight": (QT.F16, (64,), floats(64).astype(np.float16)),
        "blk.0.bias": (QT.BF16, (32,), bf16_bits(floats(32))),
        "blk.0.ffn_down.weight": (QT.Q8_0, (2, 64), gguf.quants.quantize(floats(2, 64), QT.Q8_0)),
        "positions": (QT.I32, (2, 8), np.arange(16, dtype=np.int32).reshape(2, 8) - 3),
    }


def as_float32(ggml_type: QT, stored: np.ndarray) -> np.ndarray:
    if ggml_type == QT.BF16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def expected_after_quantize(name: str, ggml_type: QT, shape: tuple[int, ...], stored: np.ndarray,
                            requested: QT) -> tuple[QT, bytes]:
    """llama-quantize's rules for these tensors, with gguf-py's quantizer as the reference for the bytes."""
    is_float = ggml_type in (QT.F32, QT.F16, QT.BF16)
    if len(shape) < 2 or not name.endswith("weight") or "_norm." in name:
        return ggml_type, stored.tobytes()  # never quantized: copied as they are
    target = requested
    if name == "token_embd.weight" and requested not in (QT.F32, QT.F16, QT.BF16):
        # no output.weight: the tied embedding gets the output's type, Q6_K (Q8_0 for a Q8_0 file),
        # whose 256-blocks do not fit rows of 64: Q8_0
        target = QT.Q8_0
    elif shape[-1] % gguf.GGML_QUANT_SIZES[requested][0]:
        target = QT.F16
    if target == ggml_type:
        return target, stored.tobytes()
    # A tensor quantized to another type is re-quantized from its dequantized values
    # (--allow-requantize, as llama-quantize).
    values = as_float32(ggml_type, stored) if is_float else gguf.quants.dequantize(stored, ggml_type)
    return target, gguf.quants.quantize(values, target).tobytes()


@pytest.fixture(scope="module")
def quantize_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quantize") / "source.gguf"
    return write_with_halfbyte(path, metadata=QUANTIZE_METADATA, tensors=quantize_source_tensors())


@pytest.mark.parametrize("type_name", list(QUANTIZE_TARGETS))
def test_quantize_command(tmp_path: Path, quantize_source: Path, type_name: str) -> None:
    requested = QUANTIZE_TARGETS[type_name]
    out_path = tmp_path / f"out-{type_name}.gguf"
    result = invoke_cli("quantize", "-q", "--allow-requantize", str(quantize_source), str(out_path),
                        type_name.upper())
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out_path.name]  # no partial file left
    source_tensors = quantize_source_tensors()
    with GGUFFile(out_path) as out:
        # llama-quantize's order: by layer (non-layer tensors first), then by name
        assert list(out.tensors) == sorted(source_tensors, key=lambda n: (n.startswith("blk."), n))
        for name, (ggml_type, shape, stored) in source_tensors.items():
            info = out.tensors[name]
            expected_type, expected_bytes = expected_after_quantize(name, ggml_type, shape, stored, requested)
            assert info.ggml_type == expected_type, name
            assert info.shape == shape, name
            assert out.tensor_bytes(name).tobytes() == expected_bytes, name
        expected_file_type = int(gguf.LlamaFileType[
            {"f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(type_name, f"MOSTLY_{type_name.upper()}")
        ])
        # as llama-quantize: the input's keys, then the quantization version and the file type
        expected_metadata = [item for item in QUANTIZE_METADATA if item[0] != "general.file_type"] + [
            ("general.quantization_version", 2, VT.UINT32, None),
            ("general.file_type", expected_file_type, VT.UINT32, None)]
        assert list(out.metadata) == [key for key, *_ in expected_metadata]
        assert_metadata_equal(out, expected_metadata)


def test_quantize_refuses_to_overwrite_its_input(tmp_path: Path, quantize_source: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(quantize_source.read_bytes())
    before = source.read_bytes()
    for output in (str(source), str(tmp_path / "." / "model.gguf")):
        result = invoke_cli("quantize", "-q", str(source), output, "q4_0")
        assert result.exit_code == 1
        assert_one_line_error(result.stderr, "")
        assert "overwrite the input" in result.stderr
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("type_name", ["q4_k", "q4_k_x", "", "q4_0 "])
def test_quantize_refuses_unknown_types(tmp_path: Path, quantize_source: Path, type_name: str) -> None:
    out_path = tmp_path / "out.gguf"
    result = invoke_cli("quantize", "-q", str(quantize_source), str(out_path), type_name)
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"unknown output type {type_name!r}")
    assert "q4_0" in result.stderr  # lists what is supported
    assert list(tmp_path.iterdir()) == []


def test_quantize_errors_are_one_line(tmp_path: Path, quantize_source: Path) -> None:
    bad_input = write_file(tmp_path / "bad.gguf", b"GGUF" + struct.pack("<I", 3))
    result = invoke_cli("quantize", "-q", str(bad_input), str(tmp_path / "out.gguf"), "q8_0")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"{bad_input}: ")
    no_dir = tmp_path / "no" / "such" / "dir" / "out.gguf"
    result = invoke_cli("quantize", "-q", str(quantize_source), str(no_dir), "q8_0")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, f"{no_dir}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
