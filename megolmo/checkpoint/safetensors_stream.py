"""The safetensors file format, read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to the end of the header) padded
with spaces to a multiple of 8 bytes, then the raw little-endian tensor bytes. Because every shape and
dtype is known before any data, the header is written first and tensors are appended as they arrive, so
at most one tensor is ever held; reading seeks to one tensor's bytes and reads only those (no memory
map, so the process's resident memory stays about the size of the tensor being read).
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megolmo.errors import MegolmoConfigError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the reference implementation accepts


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the tensor's bytes
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype, shape and absolute byte range; one-line errors for a missing, damaged or
    truncated file."""
    path = Path(path)
    if not path.is_file():
        raise MegolmoConfigError(f"safetensors file {path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MegolmoConfigError(f"safetensors file {path}: truncated ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise MegolmoConfigError(f"safetensors file {path}: truncated or not a safetensors file "
                                     f"(header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MegolmoConfigError(f"safetensors file {path}: damaged header ({e})") from None
    start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise MegolmoConfigError(f"safetensors file {path}: tensor {name} has unsupported dtype "
                                     f"{entry.get('dtype')!r}")
        dtype, shape = DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        if end - begin != nbytes(shape, dtype):
            raise MegolmoConfigError(f"safetensors file {path}: tensor {name} has {end - begin} bytes for "
                                     f"shape {list(shape)} {entry['dtype']}")
        if start + end > size:
            raise MegolmoConfigError(f"safetensors file {path}: truncated ({size} bytes; tensor {name} "
                                     f"ends at byte {start + end})")
        tensors[name] = TensorInfo(dtype, shape, start + begin, start + end)
    return tensors


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """One tensor, read straight into a fresh tensor of its own dtype (no intermediate copy). Its memory is
    reached through ctypes rather than numpy, which would make the storage non-resizable (a streaming
    writer frees tensors by resizing their storage to zero)."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        view = memoryview((ctypes.c_char * info.nbytes).from_address(out.data_ptr())).cast("B")
        with open(path, "rb", buffering=0) as f:
            f.seek(info.begin)
            done = 0
            while done < info.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise MegolmoConfigError(f"safetensors file {path}: truncated while reading a tensor")
                done += got
    return out


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """Writes one safetensors file whose tensors (name, dtype, shape) are declared up front; ``write``
    must then be called once per tensor, in the declared order."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = list(entries)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, dtype, shape in self.entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.data_bytes = offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self.entries[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: got {name} {tensor.dtype} {list(tensor.shape)}, expected {expected} "
                             f"{dtype} {list(shape)}")
        self._file.write(_raw_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            self._file.close()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.entries)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """``5GB`` (decimal, as transformers), ``500MiB`` (binary), or a byte count."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise MegolmoConfigError(f"--max-shard-size {text}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
                ) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        tensor_bytes = nbytes(entry[2], entry[1])
        if shards[-1] and size + tensor_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += tensor_bytes
    return shards
