"""What every architecture mapping provides, and the small helpers they share.

An architecture module (converters/llama.py, mpt.py, falcon.py) turns a Hugging Face
``config.json`` into GGUF metadata and a plan: for each GGUF tensor, the checkpoint
tensor it comes from, the shape the config implies, and an optional transform (a row
permutation or re-layout). The driver (converters/convert.py) does the rest: checks
the plan against the checkpoint, streams tensors through the transform and the
quantizer into the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFValueType

from engine.errors import HalfbyteError, file_error

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where it comes from and what shape it must have (numpy order)."""

    name: str
    source: str
    shape: tuple[int, ...]
    transform: Transform | None = None
    # A tensor computed by the converter, not read from the checkpoint (``source`` is then only a
    # description): llama.cpp's ``rope_freqs.weight``.
    generate: Callable[[], np.ndarray] | None = None
    # The checkpoint tensor's shape when ``transform`` changes it (GPT-2's Conv1D weights are
    # stored (in, out) and transposed); None: the same as ``shape``.
    source_shape: tuple[int, ...] | None = None
    # Checkpoint tensors stacked along a new first axis into this one (StableLM's per-head q/k
    # LayerNorms, one checkpoint tensor per head); ``source`` is then only a description.
    parts: tuple[str, ...] = ()

    def sources(self) -> list[tuple[str, tuple[int, ...]]]:
        """The checkpoint tensors this one is read from, each with the shape it must have."""
        if self.parts:
            return [(part, self.shape[1:]) for part in self.parts]
        return [(self.source, self.source_shape or self.shape)]


@dataclass
class MetadataEntry:
    key: str
    value: Any
    value_type: GGUFValueType
    elem_type: GGUFValueType | None = None


@dataclass
class ConversionPlan:
    arch: str
    metadata: list[MetadataEntry]
    tensors: list[PlannedTensor]
    # Checkpoint tensors that are expected but not written (tied heads, rotary caches).
    ignored: Callable[[str], bool] = field(default=lambda name: False)


class Architecture(Protocol):
    """The interface of an architecture module."""

    ARCH: str
    HF_ARCHITECTURES: tuple[str, ...]
    MODEL_TYPES: tuple[str, ...]

    def plan(self, config: Mapping[str, Any], config_path: Path, names: set[str]) -> ConversionPlan: ...

    def vocab(self, directory: Path, config: Mapping[str, Any]) -> list[MetadataEntry]: ...


def tensor_name(kind: MODEL_TENSOR, suffix: str = "weight", block: int | None = None) -> str:
    """The GGUF (llama.cpp) name of a tensor, from gguf-py's table: ``blk.3.attn_q.weight``."""
    base = TENSOR_NAMES[kind]
    if block is not None:
        base = base.format(bid=block)
    return f"{base}.{suffix}"


# Bounds on sizes read from config.json, checked before anything is allocated or looped over. They
# are far above every released model (the deepest have ~130 layers, the widest hidden/FFN sizes are
# ~50-75k, the largest vocabularies ~260k tokens) and low enough that a hostile value cannot make
# the plan or the padded vocabulary exhaust memory. Full conversions also check every size against
# the checkpoint's tensors; these bounds are what --vocab-only relies on.
U32_MAX = 2**32 - 1
MAX_LAYERS = 4096
MAX_DIM = 2**20
MAX_VOCAB = 2**21
F32_MAX = float(np.finfo(np.float32).max)
# Bigger JSON files than this are refused before parsing (the largest real tokenizer.json files are
# a few tens of MB; a config.json or an index is a few kB to a few MB).
MAX_JSON_BYTES = 256 * 1024 * 1024

_MISSING: Any = object()


def describe_value(value: Any, limit: int = 60) -> str:
    """A short repr for error messages (values from hostile files can be long or deeply nested)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # ValueError: an int with too many digits for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_json(raw: bytes | str, path: Path, what: str = "JSON") -> Any:
    """Parse JSON from an untrusted file: every failure json can raise on hostile input (bad syntax,
    bad UTF-8, nesting deep enough to exhaust the recursion limit, integers too long to convert)
    becomes one clean error naming the file."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text)
    except RecursionError:
        raise file_error(path, f"invalid {what}: nested too deeply") from None
    except MemoryError:
        raise file_error(path, f"invalid {what}: too large to parse") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise file_error(path, f"invalid {what}: {first_line}") from None


def read_json(path: Path, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse a JSON file; every problem (unreadable, too big, invalid, too deep) is a
    ``HalfbyteError`` naming ``path``. A missing file raises ``FileNotFoundError`` for the caller."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise file_error(path, f"{size} bytes is too big for a {what} file (limit {max_bytes})")
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise file_error(path, "is a directory, not a file") from None
    except OSError as exc:
        raise file_error(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise file_error(path, f"too big for a {what} file (limit {max_bytes} bytes)")
    return parse_json(raw, path, what)


class ConfigReader:
    """Typed, validated access to config.json: errors name the file and the key.

    Every value an architecture reads goes through a getter that checks its type and range, so a
    wrong value is one clean error (``config.json: 'num_key_value_heads' must be ...``) instead of a
    traceback or an out-of-range number reaching the GGUF writer. ``section`` reads a nested object
    (MPT's ``attn_config``) with the same checks, naming keys as ``attn_config.kv_n_heads``.
    """

    def __init__(self, config: Mapping[str, Any], path: Path, prefix: str = "") -> None:
        if not isinstance(config, Mapping):
            raise file_error(path, f"{prefix.rstrip('.') or 'config'!r} must be an object, got "
                                   f"{describe_value(config)}")
        self.config = config
        self.path = path
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, *keys: str) -> bool:
        return any(self.config.get(key) is not None for key in keys)

    def _first(self, keys: tuple[str, ...]) -> tuple[str, Any]:
        """The first of ``keys`` present and not null (configs renamed keys over time)."""
        for key in keys:
            if self.config.get(key) is not None:
                return key, self.config[key]
        return keys[0], None

    def _bad(self, key: str, expected: str, value: Any) -> HalfbyteError:
        return file_error(self.path, f"{self.name(key)!r} must be {expected}, got {describe_value(value)}")

    def _missing(self, keys: tuple[str, ...]) -> HalfbyteError:
        return file_error(self.path, f"missing {' / '.join(repr(self.name(k)) for k in keys)}")

    def int_value(self, *keys: str, default: Any = _MISSING, minimum: int = 0, maximum: int = U32_MAX) -> int:
        """An integer in [minimum, maximum]; ``default`` (unchecked) when absent, an error when
        absent without a default. The default maximum is the u32 range GGUF stores counts in."""
        key, value = self._first(keys)
        if value is None:
            if default is _MISSING:
                raise self._missing(keys)
            return default
        # JSON has one number type: 4096.0 is written by some exporters for an integer.
        if isinstance(value, float) and value.is_integer() and minimum <= value <= maximum:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            return_range = f"an integer in [{minimum}, {maximum}]"
            raise self._bad(key, return_range, value)
        return value

    def require_int(self, *keys: str, minimum: int = 1, maximum: int = MAX_DIM) -> int:
        """A required size: an integer in [minimum, maximum] (by default 1..MAX_DIM)."""
        return self.int_value(*keys, minimum=minimum, maximum=maximum)

    def float_value(self, *keys: str, default: float, minimum: float | None = None,
                    maximum: float | None = F32_MAX, positive: bool = False) -> float:
        """A finite number that fits a float32, optionally bounded; ``default`` when absent."""
        key, value = self._first(keys)
        if value is None:
            return float(default)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or abs(value) > F32_MAX or (positive and value <= 0)
                or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
            expected = "a finite number that fits a float32"
            if positive:
                expected = "a positive " + expected[2:]
            if minimum is not None or maximum not in (None, F32_MAX):
                expected += f" in [{minimum}, {maximum}]"
            raise self._bad(key, expected, value)
        return float(value)

    def bool_value(self, *keys: str, default: bool) -> bool:
        key, value = self._first(keys)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def str_value(self, *keys: str, default: str | None = None) -> str | None:
        key, value = self._first(keys)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def str_list(self, key: str) -> list[str]:
        """A list of strings (a single string is accepted as a list of one); [] when absent."""
        _, value = self._first((key,))
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self._bad(key, "a list of strings", value)
        return value

    def float_list(self, key: str, length: int) -> list[float]:
        """A list of ``length`` positive finite numbers (e.g. LongRoPE's per-pair factors)."""
        _, value = self._first((key,))
        if (not isinstance(value, list) or len(value) != length
                or not all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and
                           0 < v <= F32_MAX for v in value)):
            raise self._bad(key, f"a list of {length} positive numbers", value)
        return [float(v) for v in value]

    def section(self, key: str) -> ConfigReader:
        """A nested object (``{}`` when absent or null), read with the same checks."""
        _, value = self._first((key,))
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise self._bad(key, "an object", value)
        return ConfigReader(value, self.path, prefix=f"{self.name(key)}.")

    def token_id(self, key: str) -> int | None:
        """A special token id: an integer (or a list of them, first wins), ``None`` when absent or
        negative (``-1`` means "none" in some configs)."""
        _, value = self._first((key,))
        if isinstance(value, list) and value:
            value = value[0]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value > U32_MAX:
            raise self._bad(key, "a token id (an integer)", self.config[key])
        return value if value >= 0 else None

    def rope(self) -> tuple[float, str | None, float]:
        """(theta, scaling type, scaling factor): transformers 5 keeps these in
        ``rope_parameters``, older configs in ``rope_theta`` and ``rope_scaling``."""
        params = self.section("rope_parameters")
        scaling = self.section("rope_scaling")
        if not scaling.config:
            scaling = params
        theta = params.float_value("rope_theta", default=self.float_value("rope_theta", default=10000.0,
                                                                           positive=True), positive=True)
        kind = scaling.str_value("rope_type", "type")
        factor = scaling.float_value("factor", default=1.0, positive=True)
        if kind in (None, "default"):
            return theta, None, 1.0
        return theta, kind, factor

    def rope_scaling(self) -> tuple[float, str | None, ConfigReader]:
        """(theta, scaling type or None, the object holding the scaling parameters): ``rope_scaling``
        when present (older configs), else transformers 5's ``rope_parameters``."""
        params = self.section("rope_parameters")
        scaling = self.section("rope_scaling")
        if not scaling.config:
            scaling = params
        theta = params.float_value("rope_theta", default=self.float_value("rope_theta", default=10000.0,
                                                                           positive=True), positive=True)
        kind = scaling.str_value("rope_type", "type")
        return theta, None if kind in (None, "default") else kind, scaling

    def check_layers(self, key: str, n_layer: int, names: Collection[str], prefix: str) -> None:
        """A layer count is checked against the checkpoint before the plan loops over it: tensors
        named ``<prefix><i>.`` must exist for the last layer (``names`` is empty for --vocab-only,
        where only the MAX_LAYERS bound applies)."""
        if not names:
            return
        found = {int(part) for name in names if name.startswith(prefix)
                 for part in [name[len(prefix):].split(".", 1)[0]] if part.isdigit() and len(part) < 10}
        count = max(found) + 1 if found else 0
        if n_layer > count:
            raise self.fail(f"{self.name(key)!r} is {n_layer} but the checkpoint has {count} layers "
                            f"({prefix}N.* tensors)")

    def fail(self, reason: str) -> HalfbyteError:
        return file_error(self.path, reason)


def u32(key: str, value: int) -> MetadataEntry:
    return MetadataEntry(key, int(value), GGUFValueType.UINT32)


def f32(key: str, value: float) -> MetadataEntry:
    return MetadataEntry(key, float(value), GGUFValueType.FLOAT32)


def string(key: str, value: str) -> MetadataEntry:
    return MetadataEntry(key, value, GGUFValueType.STRING)


def boolean(key: str, value: bool) -> MetadataEntry:
    return MetadataEntry(key, bool(value), GGUFValueType.BOOL)
