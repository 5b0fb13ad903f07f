"""GGUF: ggml's single-file model format, read by memory map and written as a stream.

Layout (all little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32)
    tensor data, each tensor at data_start + offset (offsets aligned)

Strings are a u64 byte length followed by UTF-8 bytes; arrays are an element
type u32, a u64 count, then the elements.

The reader never trusts a count or a length: every one is checked against the
bytes left in the file before anything is allocated, so a hostile file costs at
most its own size and fails with a ``HalfbyteError`` naming the file. Tensor data
is never read at open: ``tensor_array`` returns zero-copy views into the map.

The writer streams: the header (metadata and tensor infos) goes first, then each
tensor as it is produced, into a temporary file beside the target that is renamed
into place only by ``finish()``. An error, Ctrl-C or a termination signal (SIGTERM,
SIGHUP, SIGQUIT: see ``GGUFWriter``) leaves no file at the target and no partial file.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.errors import HalfbyteError, TerminatedBySignal, file_error

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
READABLE_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8
MAX_TENSOR_ELEMENTS = (2**63 - 1) // 8  # so the bytes of any view (<= 8 per element) fit in int64

# Fixed-size scalar value types: struct format per type.
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}

# numpy element types of tensors whose ggml type is a plain scalar (block size 1).
_TENSOR_DTYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype("<u2"),  # raw bits; widen with `<< 16`
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


def decode_gguf_string(raw: bytes) -> str:
    # surrogateescape keeps invalid UTF-8 (seen in some vocabularies) round-trippable.
    return raw.decode("utf-8", errors="surrogateescape")


def encode_gguf_string(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def tensor_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy-order ``shape`` (last axis = ggml ne[0])."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    return n_elements // block_size * type_size


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file. ``shape`` is numpy order: ggml's ne reversed."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    part: int = 0  # which file of a split GGUF holds it (0: the first / only one)

    @property
    def n_elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml's dimension order: ne[0] is the contiguous (innermost) axis."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; errors name the file."""

    def __init__(self, buf: Any, size: int, path: str) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, reason: str) -> HalfbyteError:
        return file_error(self.path, reason)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated {what} at offset {self.pos} (needs {n} bytes, file has {self.size})")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        if length > self.size - self.pos:
            raise self.fail(f"{what} length {length} runs past the end of the file")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return decode_gguf_string(raw)


SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"


def split_prefix(path: Path, count: int) -> str | None:
    """llama.cpp's ``llama_split_prefix``: the name before ``-00001-of-0000N.gguf``, else None."""
    suffix = f"-{1:05d}-of-{count:05d}.gguf"
    name = path.name
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


class GGUFFile:
    """A GGUF file opened by memory map.

    ``metadata`` maps each key to a Python value: ``str``, ``int``, ``float``,
    ``bool``, ``list[str]`` for string arrays, a numpy array for numeric arrays.
    ``value_types`` keeps each key's GGUF type (and element type for arrays) so a
    file can be rewritten with exactly the same metadata.

    A split GGUF (llama.cpp's gguf-split: ``NAME-00001-of-00003.gguf`` ..., ``split.count`` > 1) is
    opened from its first part, which holds the metadata: the other parts are found beside it by
    name and memory-mapped too, and ``tensors`` lists the tensors of every part (``TensorInfo.part``).
    """

    def __new__(cls, path: str | os.PathLike, *args: Any, **kwargs: Any) -> GGUFFile:
        if cls is GGUFFile:  # a 2023 GGML model.bin opens as the GGUF it converts to (engine/ggml_legacy.py)
            from engine.ggml_legacy import LegacyGGMLFile, is_legacy_ggml

            if is_legacy_ggml(path):
                cls = LegacyGGMLFile
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, _split_part: bool = False) -> None:
        self.path = Path(path)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._file = None
        self._map: mmap.mmap | None = None
        self._parts: list[GGUFFile] = []  # the other files of a split GGUF
        try:
            self._file = open(self.path, "rb")
            self.file_size = os.fstat(self._file.fileno()).st_size
            if self.file_size < 4:
                raise file_error(self.path, "not a GGUF file (too short for the magic number)")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
            if not _split_part:
                self._open_split_parts()
        except HalfbyteError:
            self.close()
            raise
        except IsADirectoryError:
            self.close()
            raise file_error(self.path, "is a directory, not a GGUF file") from None
        except FileNotFoundError:
            self.close()
            raise file_error(self.path, "no such file") from None
        except PermissionError:
            self.close()
            raise file_error(self.path, "permission denied") from None
        except (OSError, ValueError) as exc:
            self.close()
            raise file_error(self.path, f"cannot read: {exc}") from None

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self) -> None:
        cur = _Cursor(self._map, self.file_size, str(self.path))
        magic = bytes(self._map[0:4])
        if magic != GGUF_MAGIC:
            raise cur.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        version = cur.u32("header")
        if version not in READABLE_VERSIONS:
            # A big-endian file's version 3 reads as 0x03000000 here.
            if version & 0x00FFFFFF == 0 and (version >> 24) in (1, 2, 3):
                raise cur.fail("big-endian GGUF files are not supported")
            if version == 1:
                raise cur.fail("GGUF version 1 is not supported (re-convert the model)")
            raise cur.fail(f"unknown GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = cur.u64("header")
        n_kv = cur.u64("header")
        # Each kv needs >= 13 bytes (key length, type, 1-byte value); each tensor info >= 24.
        if n_kv > (self.file_size - cur.pos) // 13:
            raise cur.fail(f"metadata count {n_kv} is impossible for a file of {self.file_size} bytes")
        if n_tensors > (self.file_size - cur.pos) // 24:
            raise cur.fail(f"tensor count {n_tensors} is impossible for a file of {self.file_size} bytes")

        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in self.metadata:
                raise cur.fail(f"duplicate metadata key {key!r}")
            value_type = self._value_type(cur, cur.u32(f"type of {key!r}"), key)
            elem_type = None
            if value_type == GGUFValueType.ARRAY:
                value, elem_type = self._read_array(cur, key, depth=0)
            else:
                value = self._read_scalar(cur, value_type, key)
            self.metadata[key] = value
            self.value_types[key] = (value_type, elem_type)

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            alignment = self.metadata["general.alignment"]
            if (
                self.value_types["general.alignment"][0] != GGUFValueType.UINT32
                or alignment <= 0
                or alignment & (alignment - 1)
            ):
                raise cur.fail(f"general.alignment must be a power-of-two uint32, got {alignment!r}")
            self.alignment = alignment

        raw_infos = []
        seen_names: set[str] = set()
        for index in range(n_tensors):
            name = cur.string(f"name of tensor {index}")
            if name in seen_names:
                raise cur.fail(f"duplicate tensor name {name!r}")
            seen_names.add(name)
            n_dims = cur.u32(f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            ne = [cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims)]
            type_id = cur.u32(f"type of tensor {name!r}")
            offset = cur.u64(f"offset of tensor {name!r}")
            raw_infos.append((name, ne, type_id, offset))

        # Tensor data starts at the next aligned offset after the infos.
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        data_size = self.file_size - self.data_offset
        for name, ne, type_id, offset in raw_infos:
            try:
                ggml_type = GGMLQuantizationType(type_id)
            except ValueError:
                raise cur.fail(f"tensor {name!r} has unknown type {type_id}") from None
            if ggml_type not in GGML_QUANT_SIZES:
                raise cur.fail(f"tensor {name!r} has unsupported type {ggml_type.name}")
            block_size, _ = GGML_QUANT_SIZES[ggml_type]
            # numpy cannot even shape an empty view whose nonzero dims span more than int64
            # bytes (ggml would overflow its int64 sizes too): bound the element count.
            nonzero_product = 1
            for dim in ne:
                nonzero_product *= max(dim, 1)
            if nonzero_product > MAX_TENSOR_ELEMENTS:
                raise cur.fail(f"tensor {name!r} has an impossible shape {ne}")
            row_length = ne[0] if ne else 1  # a 0-dim tensor is one element, as in ggml
            if row_length % block_size:
                raise cur.fail(
                    f"tensor {name!r} row length {row_length} is not a multiple of the "
                    f"{ggml_type.name} block size {block_size}"
                )
            shape = tuple(reversed(ne))
            nbytes = tensor_nbytes(ggml_type, shape)
            if offset % self.alignment:
                raise cur.fail(f"tensor {name!r} offset {offset} is not aligned to {self.alignment}")
            if nbytes > data_size or offset > data_size - nbytes:
                raise cur.fail(
                    f"tensor {name!r} runs past the end of the file "
                    f"(data offset {offset} + {nbytes} bytes > {max(data_size, 0)} bytes of data)"
                )
            self.tensors[name] = TensorInfo(name, ggml_type, shape, self.data_offset + offset, nbytes)

        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise cur.fail(f"tensors {first!r} and {second!r} overlap")

    def _open_split_parts(self) -> None:
        """As llama.cpp's model loader: the first part names the count; parts 2..N must say their number."""
        count = self.metadata.get(SPLIT_COUNT, 0)
        if not isinstance(count, int) or isinstance(count, bool) or count <= 1:
            return
        number = self.metadata.get(SPLIT_NO, 0)
        prefix = split_prefix(self.path, count)
        if number != 0:
            first = f"{self.path.name.rsplit('-', 3)[0]}-00001-of-{count:05d}.gguf"
            raise file_error(self.path, f"is part {number + 1} of a {count}-part split GGUF; open the first part "
                                        f"({first})")
        if prefix is None:
            raise file_error(self.path, f"is the first part of a {count}-part split GGUF but is not named "
                                        f"NAME-00001-of-{count:05d}.gguf (gguf-split's naming), so the other parts "
                                        "cannot be found")
        for index in range(1, count):
            part_path = self.path.with_name(f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf")
            if not part_path.is_file():
                raise file_error(self.path, f"split GGUF part {index + 1} of {count} is missing: {part_path}")
            part = GGUFFile(part_path, _split_part=True)
            self._parts.append(part)
            if part.metadata.get(SPLIT_NO) != index:
                raise file_error(part_path, f"metadata {SPLIT_NO} is {part.metadata.get(SPLIT_NO)!r}, expected {index} "
                                            "(a part of another split?)")
            for name, info in part.tensors.items():
                if name in self.tensors:
                    raise file_error(part_path, f"tensor {name!r} is also in an earlier part")
                self.tensors[name] = replace(info, part=index)
        expected = self.metadata.get(SPLIT_TENSORS_COUNT)
        if expected is not None and expected != len(self.tensors):
            raise file_error(self.path, f"the {count} parts hold {len(self.tensors)} tensors, "
                                        f"{SPLIT_TENSORS_COUNT} says {expected}")

    @property
    def paths(self) -> list[Path]:
        """Every file of the model: this one, then the other parts of a split GGUF."""
        return [self.path, *(part.path for part in self._parts)]

    @property
    def total_size(self) -> int:
        """Bytes of every part together."""
        return self.file_size + sum(part.file_size for part in self._parts)

    def _buffer(self, info: TensorInfo) -> mmap.mmap:
        return self._map if info.part == 0 else self._parts[info.part - 1]._map

    def _value_type(self, cur: _Cursor, type_id: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(type_id)
        except ValueError:
            raise cur.fail(f"metadata key {key!r} has unknown value type {type_id}") from None

    def _read_scalar(self, cur: _Cursor, value_type: GGUFValueType, key: str) -> Any:
        if value_type == GGUFValueType.STRING:
            return cur.string(f"value of {key!r}")
        return cur.scalar(_SCALAR_FORMATS[value_type], f"value of {key!r}")

    def _read_array(self, cur: _Cursor, key: str, depth: int) -> tuple[Any, GGUFValueType]:
        if depth >= MAX_ARRAY_NESTING:
            raise cur.fail(f"metadata key {key!r}: arrays nested deeper than {MAX_ARRAY_NESTING}")
        elem_type = self._value_type(cur, cur.u32(f"array type of {key!r}"), key)
        count = cur.u64(f"array length of {key!r}")
        if elem_type in _NUMPY_DTYPES:
            dtype = _NUMPY_DTYPES[elem_type]
            if count > (cur.size - cur.pos) // dtype.itemsize:
                raise cur.fail(f"metadata array {key!r} of {count} elements runs past the end of the file")
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=cur.pos).copy()
            cur.pos += count * dtype.itemsize
            return values, elem_type
        # Strings need >= 8 bytes each, nested arrays >= 12: bound the count before looping.
        min_size = 8 if elem_type == GGUFValueType.STRING else 12
        if count > (cur.size - cur.pos) // min_size:
            raise cur.fail(f"metadata array {key!r} of {count} elements runs past the end of the file")
        if elem_type == GGUFValueType.STRING:
            return self._read_string_array(cur, key, count), elem_type
        return [self._read_array(cur, key, depth + 1)[0] for _ in range(count)], elem_type

    def _read_string_array(self, cur: _Cursor, key: str, count: int) -> list[str]:
        # The hot path of opening a file (vocabularies hold 30k-250k strings): a tight loop
        # over the map with the bounds check inlined.
        buf, size, pos = self._map, cur.size, cur.pos
        unpack_length = struct.Struct("<Q").unpack_from
        strings = []
        append = strings.append
        for _ in range(count):
            if pos + 8 > size:
                raise cur.fail(f"truncated element of {key!r} at offset {pos}")
            (length,) = unpack_length(buf, pos)
            pos += 8
            if length > size - pos:
                raise cur.fail(f"element of {key!r} at offset {pos} runs past the end of the file")
            raw = buf[pos : pos + length]
            pos += length
            try:
                append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                append(decode_gguf_string(raw))
        cur.pos = pos
        return strings

    # -- access ----------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """A metadata value the caller cannot do without; missing -> HalfbyteError."""
        if key not in self.metadata:
            raise file_error(self.path, f"missing metadata key {key!r}")
        return self.metadata[key]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view of a tensor's bytes, shaped (*outer dims, bytes per row)."""
        info = self._info(name)
        raw = np.frombuffer(self._buffer(info), dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if not info.shape:
            return raw
        outer = info.shape[:-1]
        return raw.reshape(*outer, info.nbytes // max(1, int(np.prod(outer, dtype=np.int64))))

    def tensor_array(self, name: str) -> np.ndarray:
        """Zero-copy view in the tensor's natural element type.

        Scalar types (F32, F16, F64, I8..I64) come back typed in numpy shape; BF16 as
        uint16 raw bits; block-quantized types as uint8 rows (see ``tensor_bytes``).
        """
        info = self._info(name)
        dtype = _TENSOR_DTYPES.get(info.ggml_type)
        if dtype is None:
            return self.tensor_bytes(name)
        return np.frombuffer(self._buffer(info), dtype=dtype, count=info.n_elements, offset=info.offset).reshape(
            info.shape
        )

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise file_error(self.path, f"missing tensor {name!r}") from None

    def close(self) -> None:
        for part in self._parts:
            part.close()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views still reference the map; it closes when they are gone
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writing -------------------------------------------------------------------------------------


def _encode_value(value: Any, value_type: GGUFValueType, elem_type: GGUFValueType | None) -> bytes:
    if value_type == GGUFValueType.STRING:
        raw = value if isinstance(value, bytes) else encode_gguf_string(value)
        return struct.pack("<Q", len(raw)) + raw
    if value_type == GGUFValueType.ARRAY:
        if elem_type is None:
            raise ValueError("array metadata needs an element type")
        head = struct.pack("<IQ", elem_type, len(value))
        if elem_type in _NUMPY_DTYPES:
            return head + np.asarray(value, dtype=_NUMPY_DTYPES[elem_type]).tobytes()
        if elem_type == GGUFValueType.STRING:
            parts = []
            for item in value:
                raw = item if isinstance(item, bytes) else encode_gguf_string(item)
                parts.append(struct.pack("<Q", len(raw)))
                parts.append(raw)
            return head + b"".join(parts)
        raise ValueError(f"nested arrays are not written (element type {elem_type!r})")
    return struct.pack(_SCALAR_FORMATS[value_type], value)


# Signals that end a process and can be caught: while a partial file exists, the writer turns them
# into ``TerminatedBySignal`` so the partial file is removed as for Ctrl-C (SIGINT already raises
# KeyboardInterrupt). SIGKILL cannot be caught; nothing can clean up after it.
TERMINATION_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def refuse_overwriting_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise a ``HalfbyteError`` naming ``output`` if writing it would replace one of ``inputs``.

    Compares resolved paths (symlinks, ``..``, a symlinked directory) and, for files that exist,
    device and inode (hard links, bind mounts, case-insensitive file systems). Inputs that do not
    exist are skipped. Call it before anything is written."""
    output_path = os.fspath(output)
    output_real = os.path.realpath(output_path)
    try:
        output_stat: os.stat_result | None = os.stat(output_path)
    except (OSError, ValueError):
        output_stat = None
    for item in inputs:
        try:
            input_stat = os.stat(item)
        except (OSError, ValueError):
            continue
        if os.path.realpath(item) == output_real or (output_stat is not None and _same_file(output_stat, input_stat)):
            raise file_error(output_path, f"refusing to overwrite the input file {os.fspath(item)}")


class GGUFWriter:
    """Streaming GGUF v3 writer.

    Declare metadata (``add_*``) and every tensor (``add_tensor_info``) first, then
    ``write_tensor`` each one in declaration order, then ``finish()``. Data goes to
    ``.<name>.<pid>.partial`` beside the target and is renamed into place only when the
    file is complete; ``abort()`` (also run by the context manager on any error,
    Ctrl-C included) removes it.

    While the partial file exists, and when used from the main thread, SIGTERM, SIGHUP and
    SIGQUIT raise ``engine.errors.TerminatedBySignal`` (a ``KeyboardInterrupt``), so a killed
    conversion cleans up like an interrupted one; signals that are ignored (``nohup``) stay
    ignored, and the previous handlers are restored when the file is finished or aborted.

    ``inputs``: files the output must not overwrite (see ``refuse_overwriting_inputs``).
    """

    def __init__(self, path: str | os.PathLike, alignment: int = DEFAULT_ALIGNMENT,
                 inputs: Iterable[str | os.PathLike] = ()) -> None:
        if not 0 < alignment < 2**32 or alignment & (alignment - 1):
            # The reader (ours and llama.cpp's) refuses anything else: fail before writing a byte.
            raise ValueError(f"alignment must be a power of two that fits a uint32, got {alignment}")
        refuse_overwriting_inputs(path, inputs)
        self.path = Path(path)
        self.alignment = alignment
        self._kv: dict[str, tuple[GGUFValueType, GGUFValueType | None, Any]] = {}
        self._tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        self._next_tensor = 0
        self._tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self._out = None
        self._finished = False
        self._previous_handlers: dict[int, Any] = {}
        self._signalled: int | None = None
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, GGUFValueType.UINT32)

    # -- signals ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._signalled is None:  # a second signal during the clean-up must not interrupt it
            self._signalled = signum
            raise TerminatedBySignal(signum)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the caller's own handling applies
        for signum in TERMINATION_SIGNALS:
            try:
                previous = signal.getsignal(signum)
                if previous == signal.SIG_IGN or previous is None:
                    continue  # ignored (nohup) or set outside Python: leave it alone
                signal.signal(signum, self._on_signal)
            except (OSError, ValueError):
                continue
            self._previous_handlers[signum] = previous

    def _restore_signal_handlers(self) -> None:
        while self._previous_handlers:
            signum, previous = self._previous_handlers.popitem()
            try:
                signal.signal(signum, previous)
            except (OSError, ValueError):
                pass

    # -- metadata --------------------------------------------------------------------------------

    def add(
        self, key: str, value: Any, value_type: GGUFValueType, elem_type: GGUFValueType | None = None
    ) -> None:
        if self._out is not None:
            raise RuntimeError("metadata must be added before the header is written")
        self._kv[key] = (value_type, elem_type, value)

    def add_string(self, key: str, value: str) -> None:
        self.add(key, value, GGUFValueType.STRING)

    def add_uint32(self, key: str, value: int) -> None:
        self.add(key, int(value), GGUFValueType.UINT32)

    def add_int32(self, key: str, value: int) -> None:
        self.add(key, int(value), GGUFValueType.INT32)

    def add_float32(self, key: str, value: float) -> None:
        self.add(key, float(value), GGUFValueType.FLOAT32)

    def add_bool(self, key: str, value: bool) -> None:
        self.add(key, bool(value), GGUFValueType.BOOL)

    def add_array(self, key: str, values: Iterable[Any] | np.ndarray, elem_type: GGUFValueType) -> None:
        self.add(key, values if isinstance(values, np.ndarray) else list(values), GGUFValueType.ARRAY, elem_type)

    def copy_metadata(self, source: GGUFFile, skip: Iterable[str] = ()) -> None:
        """Copy every key of ``source`` with its exact GGUF type (except ``skip``)."""
        skipped = set(skip)
        for key, value in source.metadata.items():
            if key not in skipped and key != "general.alignment":
                value_type, elem_type = source.value_types[key]
                self.add(key, value, value_type, elem_type)

    @property
    def metadata(self) -> Mapping[str, Any]:
        return {key: value for key, (_, _, value) in self._kv.items()}

    # -- tensors ---------------------------------------------------------------------------------

    def add_tensor_info(self, name: str, shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> None:
        """Declare a tensor: numpy-order ``shape`` (last axis = ggml ne[0]) and its stored type."""
        if self._out is not None:
            raise RuntimeError("tensors must be declared before the header is written")
        if any(name == t[0] for t in self._tensors):
            raise ValueError(f"duplicate tensor name {name!r}")
        block_size, _ = GGML_QUANT_SIZES[ggml_type]
        row_length = shape[-1] if shape else 1  # the reader's rule: a 0-dim tensor is one element
        if row_length % block_size:
            raise file_error(
                self.path,
                f"tensor {name!r} row length {row_length} is not a multiple of the {ggml_type.name} "
                f"block size {block_size}",
            )
        self._tensors.append((name, tuple(int(d) for d in shape), ggml_type, tensor_nbytes(ggml_type, shape)))

    def _pad(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def write_header(self) -> None:
        """Write magic, metadata and tensor infos: from here on only tensor data follows."""
        parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))]
        for key, (value_type, elem_type, value) in self._kv.items():
            parts.append(_encode_value(key, GGUFValueType.STRING, None))
            parts.append(struct.pack("<I", value_type))
            try:
                parts.append(_encode_value(value, value_type, elem_type))
            except (struct.error, OverflowError, UnicodeEncodeError, TypeError) as exc:
                # Callers validate their values; this keeps a value that slipped through from
                # becoming a traceback (e.g. a u32 out of range, a lone surrogate in a string).
                raise file_error(self.path, f"cannot store metadata {key!r} as {value_type.name}: {exc}") from None
        offset = 0
        for name, shape, ggml_type, nbytes in self._tensors:
            ne = tuple(reversed(shape))
            parts.append(_encode_value(name, GGUFValueType.STRING, None))
            parts.append(struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset))
            offset += self._pad(nbytes)
        header = b"".join(parts)
        self._install_signal_handlers()  # before the partial file exists: no window without them
        try:
            self._out = open(self._tmp_path, "wb")
        except BaseException:
            self._restore_signal_handlers()
            raise
        self._out.write(header)
        self._out.write(b"\0" * (self._pad(len(header)) - len(header)))

    def write_tensor(self, name: str, data: np.ndarray | bytes | Iterable[np.ndarray | bytes]) -> None:
        """Append the next declared tensor's bytes (already in its stored type).

        ``data`` may be one buffer or an iterable of buffers (e.g. row chunks), so a
        big tensor can be converted and written without holding it whole.
        """
        if self._out is None:
            self.write_header()
        if self._next_tensor >= len(self._tensors):
            raise RuntimeError(f"tensor {name!r} was not declared")
        expected_name, _, ggml_type, nbytes = self._tensors[self._next_tensor]
        if name != expected_name:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {expected_name!r})")
        chunks = [data] if isinstance(data, (np.ndarray, bytes, bytearray, memoryview)) else data
        written = 0
        for chunk in chunks:
            buf = memoryview(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk).cast("B")
            written += buf.nbytes
            if written > nbytes:
                break
            self._out.write(buf)
        if written != nbytes:
            raise RuntimeError(f"tensor {name!r}: {written} bytes given, {nbytes} declared ({ggml_type.name})")
        self._out.write(b"\0" * (self._pad(nbytes) - nbytes))
        self._next_tensor += 1

    def finish(self) -> Path:
        """Complete the file and move it into place; returns the final path."""
        if self._out is None:
            self.write_header()
        if self._next_tensor != len(self._tensors):
            missing = self._tensors[self._next_tensor][0]
            raise RuntimeError(f"finish() before all tensors were written (next: {missing!r})")
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        self._out = None
        os.replace(self._tmp_path, self.path)
        self._finished = True
        self._restore_signal_handlers()
        return self.path

    def abort(self) -> None:
        """Drop the partial file; the target is left untouched."""
        try:
            if self._out is not None:
                out, self._out = self._out, None
                out.close()
        finally:
            try:
                self._tmp_path.unlink()
            except FileNotFoundError:
                pass
            finally:
                self._restore_signal_handlers()

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._finished:
            self.abort()
