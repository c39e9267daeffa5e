"""Streaming safetensors reader and writer on any fsspec file system.

The reader memory-maps local files and reads byte ranges from remote ones
(gs://), so one tensor at a time is ever on the host. The writer streams
tensors to a temporary file and renames it into place, so an interrupted
save never leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import fsspec
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def is_local(path: str) -> bool:
  return "://" not in str(path) or str(path).startswith("file://")


class SafetensorsFile:
  """Lazily reads the tensors of one ``.safetensors`` file (local or remote)."""

  def __init__(self, path: str):
    self.path = str(path)
    with fsspec.open(self.path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    self.header = header
    self._data_start = 8 + header_len
    self._mmap = None
    if is_local(self.path):
      self._mmap = np.memmap(self.path.removeprefix("file://"), dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    dtype = _DTYPES[info["dtype"]]
    start, end = (self._data_start + o for o in info["data_offsets"])
    if self._mmap is not None:
      raw = self._mmap[start:end]
    else:
      with fsspec.open(self.path, "rb") as f:
        f.seek(start)
        raw = np.frombuffer(f.read(end - start), np.uint8)
    return raw.view(dtype).reshape(info["shape"])


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata=None):
  """Writes ``(name, array)`` pairs as one safetensors file, atomically where local."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, arr in tensors:
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = {
        "dtype": _NAMES[np.dtype(arr.dtype)],
        "shape": list(arr.shape),
        "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  header["__metadata__"] = metadata or {"format": "pt"}
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)
  tmp = f"{path}.tmp" if is_local(path) else path
  with fsspec.open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).tobytes())
  if tmp != path:
    os.replace(tmp, path)
