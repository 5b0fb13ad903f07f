"""Read the weights of a Hugging Face checkpoint directory lazily, one tensor at a time, as float32.

Formats: safetensors (``model.safetensors``, sharded with ``model.safetensors.index.json``, or any
set of ``*.safetensors`` files) and PyTorch zip checkpoints (``pytorch_model.bin``, sharded with
``pytorch_model.bin.index.json``). Opening a checkpoint reads only headers (the safetensors JSON,
the pickle of a ``.bin``); ``load(name)`` then reads exactly the bytes of that tensor with
positioned reads into a fresh numpy buffer. Nothing is memory-mapped: with a long-lived mmap the
pages of every tensor already converted would stay resident, and a 13B checkpoint would end up
entirely in RSS by the end of a conversion.

``.bin`` files are read without torch and without running pickle code: a restricted unpickler
maps the handful of globals a ``torch.save`` state dict uses to inert stand-ins that only record
where each tensor's bytes are, and refuses every other global.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from converters.base import describe_value, parse_json, read_json
from engine.errors import HalfbyteError, file_error

SUPPORTED_DTYPES = ("F32", "F16", "BF16")

# Bits per element of every dtype name a checkpoint may declare (safetensors spelling; torch
# storages are mapped onto these names). Only SUPPORTED_DTYPES can be loaded, the others are known
# so that sizes can still be validated and errors can name them.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "C128": 128,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors itself refuses headers above 100 MB; a larger length means a corrupt or foreign file.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# F16/BF16 are widened through a scratch buffer of this many elements, so loading a tensor costs
# its float32 size plus at most this chunk, not float32 + the whole stored copy.
WIDEN_CHUNK_ELEMENTS = 1 << 22

# data.pkl (the state dict's pickle) is inflated with a bound, before unpickling: a torch.save record
# takes 150-400 bytes, so 4 KiB per storage record in the archive plus 64 KiB is generous, and 16 MiB
# (some 50,000 tensors) is more than any real single file holds. Without the bound a small zip whose
# data.pkl inflates to gigabytes costs gigabytes of memory before the pickle is even looked at.
MAX_PICKLE_BYTES = 16 * 1024 * 1024
PICKLE_BYTES_BASE = 64 * 1024
PICKLE_BYTES_PER_RECORD = 4 * 1024
MAX_TENSOR_DIMS = 16  # torch allows more, no model weight has more than a handful
# A view with more elements than its storage (an expand) is materialized up to this many elements.
MAX_EXPANDED_ELEMENTS = 2**26
MAX_ELEMENTS = 2**62  # any count beyond this is corrupt (and would overflow int64 byte offsets)

# What zipfile can raise on a corrupt or hostile archive besides BadZipFile (unsupported compression,
# encryption, bad deflate streams, out-of-range header fields).
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError, OverflowError,
              struct.error, zlib.error)

ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version..sizes), name length, extra length
ZIP_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
# torch.save(..., _use_new_zipfile_serialization=False) starts with this number, pickled (protocol 2).
LEGACY_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


@dataclass(frozen=True)
class TensorMeta:
    """What a checkpoint says about one tensor; ``shape`` is in numpy (row-major) order."""

    name: str
    dtype: str  # one of SUPPORTED_DTYPES
    shape: tuple[int, ...]
    file: Path


# --------------------------------------------------------------------------------------------
# Which files hold the weights


@dataclass(frozen=True)
class WeightLayout:
    """The weight files of a checkpoint: ``index`` (a ``*.index.json`` naming the shards) or ``files``."""

    format: str  # "safetensors" or "bin"
    index: str | None
    files: tuple[str, ...]


def _is_bin_shard(name: str) -> bool:
    return name.startswith("pytorch_model-") and name.endswith(".bin")


def pick_weight_layout(available: Collection[str]) -> WeightLayout | None:
    """Choose the weight files among the top-level file names of a checkpoint (a directory or a hub
    repo), in transformers' order of preference: safetensors before .bin, a single file before an
    index. Without an index, all ``*.safetensors`` (or ``pytorch_model-*.bin``) files are the shards.
    ``None`` when there are no weights."""
    names = {name for name in available if "/" not in name}
    if SAFETENSORS_SINGLE in names:
        return WeightLayout("safetensors", None, (SAFETENSORS_SINGLE,))
    if SAFETENSORS_INDEX in names:
        return WeightLayout("safetensors", SAFETENSORS_INDEX, ())
    safetensors = sorted(name for name in names if name.endswith(".safetensors"))
    if safetensors:
        return WeightLayout("safetensors", None, tuple(safetensors))
    if BIN_SINGLE in names:
        return WeightLayout("bin", None, (BIN_SINGLE,))
    if BIN_INDEX in names:
        return WeightLayout("bin", BIN_INDEX, ())
    shards = sorted(name for name in names if _is_bin_shard(name))
    if shards:
        return WeightLayout("bin", None, tuple(shards))
    return None


def read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``*.index.json``."""
    try:
        index = read_json(index_path, "JSON")
    except FileNotFoundError:
        raise file_error(index_path, "missing") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise file_error(index_path, "no \"weight_map\" object (tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise file_error(index_path, f"weight_map entry {describe_value(name)} is not a file name: "
                                         f"{describe_value(shard)}")
        # Shards live next to the index; a path climbing out of the directory is not a shard.
        if Path(shard).is_absolute() or ".." in Path(shard).parts or "\0" in shard:
            raise file_error(index_path, f"weight_map entry {describe_value(name)} points outside the checkpoint: "
                                         f"{describe_value(shard)}")
    return weight_map


# --------------------------------------------------------------------------------------------
# Reading bytes


class _ByteSource(Protocol):
    def readinto(self, offset: int, buffer: np.ndarray) -> None: ...

    def close(self) -> None: ...


class _FileBytes:
    """Positioned reads from one file, opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: io.FileIO | None = None

    def readinto(self, offset: int, buffer: np.ndarray) -> None:
        if self._file is None:
            try:
                self._file = io.FileIO(self.path, "r")
            except OSError as exc:
                raise file_error(self.path, f"cannot open: {exc.strerror or exc}") from None
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        end = offset + len(view)
        try:
            while view:
                if hasattr(os, "preadv"):  # no shared file position: safe however readers are scheduled
                    count = os.preadv(self._file.fileno(), [view], offset)
                else:
                    self._file.seek(offset)
                    count = self._file.readinto(view) or 0
                if count == 0:
                    raise file_error(self.path, f"truncated: tensor data ends at byte {end}, beyond the end of file")
                view = view[count:]
                offset += count
        except OSError as exc:
            raise file_error(self.path, f"cannot read: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _ZipMemberBytes:
    """Reads from a compressed zip member (torch never compresses, but re-zipped files exist):
    zipfile decompresses up to the offset, which is slow but correct."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
        self.path = path
        self.archive = archive
        self.member = member

    def readinto(self, offset: int, buffer: np.ndarray) -> None:
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        try:
            with self.archive.open(self.member) as stream:
                stream.seek(offset)
                while view:
                    count = stream.readinto(view)
                    if not count:
                        raise file_error(self.path, f"truncated zip member {self.member.filename}")
                    view = view[count:]
        except HalfbyteError:
            raise
        except ZIP_ERRORS as exc:
            raise file_error(self.path, f"corrupt zip member {self.member.filename}: "
                                        f"{describe_value(str(exc), 120)}") from None

    def close(self) -> None:
        self.archive.close()


def _read_float32(source: _ByteSource, offset: int, count: int, dtype: str, big_endian: bool) -> np.ndarray:
    """``count`` consecutive elements of ``dtype`` at byte ``offset``, widened exactly to float32."""
    result = np.empty(count, dtype=np.float32)
    if count == 0:
        return result
    if dtype == "F32":
        source.readinto(offset, result)
        if big_endian:
            result.byteswap(inplace=True)
        return result
    stored = np.dtype(np.float16 if dtype == "F16" else np.uint16).newbyteorder(">" if big_endian else "<")
    chunk = min(count, WIDEN_CHUNK_ELEMENTS)
    scratch = np.empty(chunk, dtype=stored)
    result_bits = result.view(np.uint32)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        source.readinto(offset + start * 2, scratch[:n])
        if dtype == "F16":
            result[start : start + n] = scratch[:n]
        else:
            # bfloat16 is the top half of a float32: shifting the bits up is the exact conversion.
            bits = result_bits[start : start + n]
            bits[...] = scratch[:n]
            bits <<= 16
    return result


# --------------------------------------------------------------------------------------------
# The checkpoint


@dataclass(frozen=True)
class _TensorLocation:
    """Where a tensor's elements are: ``span`` elements from ``byte_offset`` in ``source``, viewed
    through element ``strides`` (``None`` means row-major contiguous)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    source: _ByteSource
    byte_offset: int
    span: int
    strides: tuple[int, ...] | None = None
    big_endian: bool = False


class Checkpoint:
    """The tensors of a checkpoint directory. Use as a context manager or call ``close()``."""

    def __init__(self, directory: Path, locations: Iterable[_TensorLocation], sources: Iterable[_ByteSource]) -> None:
        self.directory = directory
        self._locations = {location.name: location for location in locations}
        self._sources = list(sources)
        self._closed = False

    def names(self) -> list[str]:
        """Every tensor name, in file order (shard by shard)."""
        return list(self._locations)

    def __contains__(self, name: object) -> bool:
        return name in self._locations

    def __len__(self) -> int:
        return len(self._locations)

    def info(self, name: str) -> TensorMeta:
        """Dtype, shape and file of ``name``; raises for dtypes halfbyte cannot convert."""
        location = self._location(name)
        return TensorMeta(location.name, location.dtype, location.shape, location.file)

    def load(self, name: str) -> np.ndarray:
        """The tensor as a fresh float32 array, reading only its own bytes."""
        location = self._location(name)
        values = _read_float32(location.source, location.byte_offset, location.span, location.dtype,
                               location.big_endian)
        if location.strides is None:
            return values.reshape(location.shape)
        itemsize = values.itemsize
        strided = np.lib.stride_tricks.as_strided(
            values, shape=location.shape, strides=tuple(step * itemsize for step in location.strides), writeable=False
        )
        return np.ascontiguousarray(strided)

    def _location(self, name: str) -> _TensorLocation:
        if self._closed:
            raise file_error(self.directory, "checkpoint is closed")
        location = self._locations.get(name)
        if location is None:
            raise file_error(self.directory, f"checkpoint has no tensor {name!r}")
        if location.dtype not in SUPPORTED_DTYPES:
            what = "unsupported" if location.dtype in DTYPE_BITS else "unknown"
            raise file_error(
                location.file,
                f"tensor {name!r} has {what} dtype {location.dtype} (halfbyte reads {', '.join(SUPPORTED_DTYPES)})",
            )
        return location

    def close(self) -> None:
        for source in self._sources:
            source.close()
        self._sources = []
        self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_checkpoint(directory: Path) -> Checkpoint:
    """Index the weights of a checkpoint directory (headers only; tensors are read by ``load``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise file_error(directory, "not a directory" if directory.exists() else "no such directory")
    layout = pick_weight_layout([entry.name for entry in directory.iterdir() if entry.is_file()])
    if layout is None:
        raise file_error(
            directory,
            f"no weights found ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, *.safetensors, {BIN_SINGLE} or {BIN_INDEX})",
        )
    expected: dict[str, str] = {}
    shard_names = list(layout.files)
    if layout.index is not None:
        index_path = directory / layout.index
        expected = read_index(index_path)
        shard_names = sorted(set(expected.values()))
        for shard in shard_names:
            if not (directory / shard).is_file():
                raise file_error(directory / shard, f"missing (listed in {layout.index})")

    sources: list[_ByteSource] = []
    locations: dict[str, _TensorLocation] = {}
    try:
        for shard in shard_names:
            path = directory / shard
            if layout.format == "safetensors":
                shard_locations = _index_safetensors(path, sources)
            else:
                shard_locations = _index_torch_zip(path, sources)
            for location in shard_locations:
                if location.name in locations:
                    raise file_error(path, f"tensor {location.name!r} is also in {locations[location.name].file.name}")
                locations[location.name] = location
        for name, shard in expected.items():
            found = locations.get(name)
            if found is None or found.file != directory / shard:
                raise file_error(directory / shard, f"has no tensor {name!r} (listed for it in {layout.index})")
    except BaseException:
        for source in sources:
            source.close()
        raise
    return Checkpoint(directory, locations.values(), sources)


# --------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, JSON header, raw little-endian data


def _index_safetensors(path: Path, sources: list[_ByteSource]) -> list[_TensorLocation]:
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise file_error(path, f"truncated: {file_size} bytes, shorter than the 8-byte header length")
            (header_length,) = struct.unpack("<Q", f.read(8))
            if header_length > MAX_SAFETENSORS_HEADER:
                raise file_error(path, f"header length {header_length} is implausible: not a safetensors file?")
            if header_length > file_size - 8:
                raise file_error(path, f"truncated: header needs {header_length} bytes, file has {file_size - 8}")
            raw_header = f.read(header_length)
    except OSError as exc:
        raise file_error(path, f"cannot read: {exc.strerror or exc}") from None
    header = parse_json(raw_header, path, "header JSON")
    if not isinstance(header, dict):
        raise file_error(path, "invalid header JSON: expected an object")

    source = _FileBytes(path)
    sources.append(source)
    data_start = 8 + header_length
    locations = []
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _safetensors_entry(path, name, entry)
        count = math.prod(shape)
        bits = DTYPE_BITS.get(dtype)
        needed = (count * bits + 7) // 8 if bits is not None else end - begin
        if end - begin != needed:
            raise file_error(path, f"tensor {name!r}: data_offsets span {end - begin} bytes, {dtype} {shape} "
                                   f"needs {needed}")
        if data_start + end > file_size:
            raise file_error(
                path, f"tensor {name!r} data ends at byte {data_start + end}, beyond the end of the file "
                      f"({file_size} bytes): truncated?"
            )
        spans.append((begin, end, name))
        locations.append(_TensorLocation(name, dtype, shape, path, source, data_start + begin, count))
    _check_safetensors_layout(path, spans, file_size - data_start)
    return locations


def _check_safetensors_layout(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors tile the data section exactly: no overlap, no gap, nothing after the last one.

    Overlapping (aliased) tensors would be harmless to us, since we only read and every tensor is
    bounded inside the file. But the safetensors library (``SafeTensors::deserialize``, so
    transformers and llama.cpp's converter) refuses overlaps, gaps and trailing bytes as an invalid
    file, and a converter that accepts what the reference refuses hides corruption: we refuse them too.
    """
    position = 0
    previous = None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise file_error(path, f"invalid header: tensor {name!r} data_offsets [{begin}, {end}] overlap "
                                   f"tensor {previous!r} (safetensors forbids overlapping tensors)")
        if begin > position:
            raise file_error(path, f"invalid header: {begin - position} bytes of data before tensor {name!r} "
                                   f"belong to no tensor (safetensors forbids gaps)")
        position, previous = end, name
    if position != data_size:
        raise file_error(path, f"invalid header: the data section holds {data_size} bytes, the tensors cover "
                               f"{position} (safetensors forbids unused bytes)")


def _safetensors_entry(path: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    def is_count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict):
        raise file_error(path, f"invalid header: entry {describe_value(name)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise file_error(path, f"invalid header: tensor {name!r} has no dtype")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(is_count(size) for size in shape)
            or math.prod(shape) > MAX_ELEMENTS):
        raise file_error(path, f"invalid header: tensor {name!r} has shape {describe_value(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise file_error(path, f"invalid header: tensor {name!r} has data_offsets {describe_value(offsets)}")
    return dtype, tuple(shape), (offsets[0], offsets[1])


# --------------------------------------------------------------------------------------------
# PyTorch zip checkpoints: <archive>/data.pkl (the state dict, tensors as persistent ids) and one
# record <archive>/data/<key> per storage, stored uncompressed and 64-byte aligned.

TORCH_STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "DoubleStorage": "F64", "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16",
    "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64", "ComplexDoubleStorage": "C128",
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: just the element type."""

    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    """Stand-in for a storage: which ``data/<key>`` record, its element type and length."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRecord:
    """Stand-in for a tensor: a strided view of a storage (offsets and strides in elements)."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` state dict into stand-ins, refusing every other global.

    The only callables a pickle can reach are the ones ``find_class`` returns, so this whitelist is
    the whole attack surface: it holds ``OrderedDict`` (inert) and functions of this class that
    build records from plain values.
    """

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path
        self._globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch", "Size"): self._size,
        }
        for class_name, dtype in TORCH_STORAGE_DTYPES.items():
            self._globals[("torch", class_name)] = _StorageType(dtype)

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is None:
            raise file_error(self.path, f"refusing to unpickle {module}.{name}: not a tensor checkpoint")
        return found

    def persistent_load(self, pid: Any) -> _StorageRef:
        # torch.save writes ('storage', storage type, key, location, number of elements).
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and _is_index(pid[4]) and 0 <= pid[4] <= MAX_ELEMENTS):
            return _StorageRef(key=pid[2], dtype=pid[1].dtype, numel=pid[4])
        raise file_error(self.path, f"unexpected persistent id {describe_value(pid, 80)}: not a tensor checkpoint")

    def _rebuild_tensor(self, storage: Any, offset: Any, shape: Any, stride: Any, *_ignored: Any) -> _TensorRecord:
        # (requires_grad, backward_hooks, metadata) follow; none of them matter for the values.
        # Every field is checked here, field by field, so a bad record is named precisely.
        def bad(what: str, value: Any) -> HalfbyteError:
            return file_error(self.path, f"malformed tensor record in data.pkl: {what} {describe_value(value)}")

        if not isinstance(storage, _StorageRef):
            raise bad("storage", storage)
        if not _is_index(offset) or not 0 <= offset <= storage.numel:
            raise bad(f"storage offset (storage {storage.key!r} has {storage.numel} elements)", offset)
        if (not isinstance(shape, tuple) or len(shape) > MAX_TENSOR_DIMS
                or not all(_is_index(n) and 0 <= n <= MAX_ELEMENTS for n in shape) or math.prod(shape) > MAX_ELEMENTS):
            raise bad("shape", shape)
        if (not isinstance(stride, tuple) or len(stride) != len(shape)
                or not all(_is_index(s) and 0 <= s <= MAX_ELEMENTS for s in stride)):
            raise bad(f"stride (for shape {shape})", stride)
        return _TensorRecord(storage, offset, shape, stride)

    def _rebuild_parameter(self, data: Any, *_ignored: Any) -> _TensorRecord:
        if not isinstance(data, _TensorRecord):
            raise file_error(self.path, "malformed parameter record in data.pkl")
        return data

    def _size(self, sizes: Any = ()) -> tuple[int, ...]:
        if not isinstance(sizes, (tuple, list)):
            raise file_error(self.path, f"malformed torch.Size in data.pkl: {describe_value(sizes)}")
        return tuple(sizes)


def _check_torch_zip(path: Path) -> None:
    """Refuse, with a reason, files that are not zip archives (legacy torch format, truncation)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise file_error(path, f"cannot read: {exc.strerror or exc}") from None
    if zipfile.is_zipfile(path):
        return
    if head[:2] == b"\x80\x02" and LEGACY_TORCH_MAGIC in head[:16]:
        raise file_error(path, "legacy (pre-1.6) PyTorch format is not supported: re-save it with torch.save() "
                               "from PyTorch >= 1.6 or convert it to safetensors")
    if head[257:262] == b"ustar":
        raise file_error(path, "legacy tar-based PyTorch format is not supported: re-save it with torch.save()")
    if head.startswith(ZIP_LOCAL_HEADER_SIGNATURE):
        raise file_error(path, "truncated: zip archive without its central directory")
    raise file_error(path, "not a PyTorch zip checkpoint")


def _index_torch_zip(path: Path, sources: list[_ByteSource]) -> list[_TensorLocation]:
    _check_torch_zip(path)
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise file_error(path, f"corrupt zip archive: {exc}") from None
    keep_archive_open = False
    try:
        members = {member.filename: member for member in archive.infolist()}
        pickles = [name for name in members if name.rsplit("/", 1)[-1] == "data.pkl" and name.count("/") <= 1]
        if len(pickles) != 1:
            raise file_error(path, "no single <archive>/data.pkl record: not a torch.save checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        raw_byteorder = _read_member(path, archive, members.get(prefix + "byteorder"), limit=64, default=b"little")
        byteorder = raw_byteorder.decode("ascii", errors="replace").strip()
        if byteorder not in ("little", "big"):
            raise file_error(path, f"unknown byteorder record {describe_value(byteorder)}")
        n_records = sum(1 for name in members if name.startswith(f"{prefix}data/"))
        pickle_limit = min(MAX_PICKLE_BYTES, PICKLE_BYTES_BASE + PICKLE_BYTES_PER_RECORD * n_records)
        state = _unpickle_state_dict(path, _read_member(path, archive, members[pickles[0]], limit=pickle_limit))

        file_bytes = _FileBytes(path)
        sources.append(file_bytes)
        file_size = path.stat().st_size
        data_offsets: dict[str, int] = {}
        locations = []
        for name, record in state.items():
            storage = record.storage
            member_name = f"{prefix}data/{storage.key}"
            member = members.get(member_name)
            if member is None:
                raise file_error(path, f"tensor {name!r}: storage record {member_name} is missing")
            bits = DTYPE_BITS[storage.dtype]
            itemsize = bits // 8
            if member.file_size < storage.numel * itemsize:
                raise file_error(path, f"storage {member_name} holds {member.file_size} bytes, "
                                       f"{storage.numel} {storage.dtype} elements need {storage.numel * itemsize}")
            span, strides = _strided_span(path, name, record.shape, record.stride)
            if record.offset + span > storage.numel:
                raise file_error(path, f"tensor {name!r} extends beyond its storage {member_name}")
            if math.prod(record.shape) > max(storage.numel, MAX_EXPANDED_ELEMENTS):
                # Only a view with zero or overlapping strides (torch's expand) has more elements than
                # its storage; beyond a bound it is refused, so a tiny file cannot claim a huge tensor.
                raise file_error(path, f"tensor {name!r} has {math.prod(record.shape)} elements, more than its "
                                       f"storage {member_name} holds ({storage.numel}): overlapping strides")
            if member.compress_type == zipfile.ZIP_STORED and not member.flag_bits & 0x1:
                if member_name not in data_offsets:
                    data_offsets[member_name] = _stored_member_offset(path, member, file_size)
                source: _ByteSource = file_bytes
                byte_offset = data_offsets[member_name] + record.offset * itemsize
            else:
                if member.flag_bits & 0x1:
                    raise file_error(path, f"storage {member_name} is encrypted")
                source = _ZipMemberBytes(path, archive, member)
                sources.append(source)  # closing it closes the shared archive
                keep_archive_open = True
                byte_offset = record.offset * itemsize
            locations.append(_TensorLocation(name, storage.dtype, record.shape, path, source, byte_offset, span,
                                             strides, byteorder == "big"))
        return locations
    finally:
        if not keep_archive_open:
            archive.close()


def _read_member(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo | None, limit: int,
                 default: bytes = b"") -> bytes:
    """A small zip member, inflated incrementally and refused beyond ``limit`` bytes (whatever its
    header declares), so a decompression bomb costs at most ``limit`` bytes of memory."""
    if member is None:
        return default
    if member.file_size > limit:
        raise file_error(path, f"{member.filename} is {member.file_size} bytes uncompressed, more than the "
                               f"{limit} allowed for it: not a plausible torch.save checkpoint")
    try:
        with archive.open(member) as stream:
            data = stream.read(limit + 1)
    except ZIP_ERRORS as exc:
        raise file_error(path, f"corrupt zip member {member.filename}: {describe_value(str(exc), 120)}") from None
    if len(data) > limit:
        raise file_error(path, f"{member.filename} inflates to more than the {limit} bytes allowed for it: "
                               f"not a plausible torch.save checkpoint")
    return data


def _unpickle_state_dict(path: Path, data: bytes) -> dict[str, _TensorRecord]:
    try:
        state = _RestrictedUnpickler(data, path).load()
    except HalfbyteError:
        raise
    except Exception as exc:  # any malformed pickle: UnpicklingError, EOFError, TypeError from bad REDUCE args...
        raise file_error(path, f"corrupt data.pkl: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise file_error(path, f"data.pkl holds a {type(state).__name__}, not a state dict (name -> tensor)")
    for name, record in state.items():
        if not isinstance(name, str) or not isinstance(record, _TensorRecord):
            raise file_error(path, f"state dict entry {str(name)[:80]!r} is not a tensor")
    return state


def _strided_span(path: Path, name: str, shape: tuple[int, ...], stride: tuple[int, ...]
                  ) -> tuple[int, tuple[int, ...] | None]:
    """How many storage elements a view covers, and its strides (``None`` when row-major contiguous,
    which needs no re-layout)."""
    count = math.prod(shape)
    if count == 0:
        return 0, None
    contiguous_step = 1
    contiguous = True
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != contiguous_step:
            contiguous = False
        contiguous_step *= size
    if contiguous:
        return count, None
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride)), stride


def _stored_member_offset(path: Path, member: zipfile.ZipInfo, file_size: int) -> int:
    """Byte offset of an uncompressed member's data: after its local header, whose extra field
    (torch pads it for alignment) may differ from the central directory's copy."""
    try:
        with open(path, "rb") as f:
            f.seek(member.header_offset)
            header = f.read(ZIP_LOCAL_HEADER.size)
    except OSError as exc:
        raise file_error(path, f"cannot read: {exc.strerror or exc}") from None
    if len(header) < ZIP_LOCAL_HEADER.size:
        raise file_error(path, f"truncated: local header of {member.filename} is cut off")
    signature, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(header)
    if signature != ZIP_LOCAL_HEADER_SIGNATURE:
        raise file_error(path, f"corrupt zip archive: bad local header for {member.filename}")
    offset = member.header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length
    if offset + member.file_size > file_size:
        raise file_error(path, f"{member.filename} data ends at byte {offset + member.file_size}, beyond the end "
                               f"of the file ({file_size} bytes): truncated?")
    return offset

