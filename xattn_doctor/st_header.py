"""Read and validate a safetensors header ourselves, before any library maps the file.

A hostile header (one that claims gigabytes, offsets past the end, overlapping tensors, a dtype
that does not fit the shape) must become one clear error, with nothing allocated for it. The
format: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xattn_doctor.errors import CheckpointError, DoctorError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
               "U16": "uint16", "U32": "uint32", "U64": "uint64"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: its dtype code, shape and byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> str:
        """The dtype's torch name, e.g. 'bfloat16'."""
        return TORCH_NAMES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A validated header: the tensors by name, and the file's size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int
    data_start: int = 0  # file offset of the data buffer (8 + header length)


def read_header(path: Path, error: type[DoctorError] = CheckpointError) -> Header:
    """Parse and check `path`'s header; raise `error` (one line) on anything malformed."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise error(path, f"not a safetensors file: {size} bytes, shorter than the "
                                  "8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise error(path, f"not a safetensors file (or truncated): its header claims "
                                  f"{n} bytes but the file has {size - 8} after the length")
            raw = fh.read(n)
    except OSError as e:
        raise error(path, f"cannot read: {e.strerror or e}") from e
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError as e:
        raise error(path, "not a safetensors file: header JSON is nested too deeply") from e
    except ValueError as e:  # bad UTF-8, bad JSON, an integer literal of thousands of digits
        raise error(path, f"not a safetensors file: header is not JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(path, "not a safetensors file: header is not a JSON object")
    meta = data.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise error(path, "malformed safetensors header: __metadata__ is not an object")
    tensors = {str(k): _entry(path, k, v, error) for k, v in data.items()}
    _check_layout(path, tensors, size - 8 - n, error)
    return Header(path, tensors, {str(k): str(v) for k, v in meta.items()}, size, 8 + n)


def _entry(path: Path, key: str, v: Any, error: type[DoctorError]) -> TensorInfo:
    if not isinstance(v, dict):
        raise error(path, f"malformed safetensors header: entry {key!r} is not an object")
    dtype, shape, offs = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise error(path, f"tensor {key!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise error(path, f"tensor {key!r} has a malformed shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)
            and offs[0] <= offs[1]):
        raise error(path, f"tensor {key!r} has malformed data_offsets {offs!r}")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offs[1] - offs[0] != nbytes:
        raise error(path, f"tensor {key!r}: dtype {dtype} and shape {shape} need {nbytes} "
                          f"bytes but its offsets span {offs[1] - offs[0]}")
    return TensorInfo(dtype, tuple(shape), offs[0], offs[1])


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(path: Path, tensors: dict[str, TensorInfo], buffer: int,
                  error: type[DoctorError]) -> None:
    end = 0
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.end > buffer:
            raise error(path, f"tensor {key!r} ends at byte {t.end} of the data buffer, past "
                              f"its end ({buffer} bytes): truncated or corrupt")
        if t.start < end:
            raise error(path, f"tensor {key!r} overlaps the tensor before it (bytes "
                              f"{t.start}..{t.end}): corrupt or crafted file")
        if t.start > end:
            raise error(path, f"bytes {end}..{t.start} of the data buffer belong to no tensor "
                              f"(before {key!r}): corrupt or crafted file")
        end = max(end, t.end)
    if end != buffer:
        raise error(path, f"the data buffer has {buffer} bytes but its tensors cover {end}: "
                          "trailing bytes, corrupt or crafted file")
