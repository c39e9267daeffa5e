"""Streaming safetensors reader and writer on any fsspec file system.

The reader memory-maps local files and reads byte ranges from remote ones
(gs://), so one tensor at a time is ever on the host. The writer is the
``safetensors`` library's, writing to a temporary file that is renamed (or
uploaded) once complete, so an interrupted save never leaves a truncated
checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping

import fsspec
import ml_dtypes
import numpy as np

from tropd_jax.cli import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def is_local(path: str) -> bool:
  return "://" not in str(path) or str(path).startswith("file://")


class CorruptFileError(UserError, ValueError):
  """A safetensors file whose header and size disagree (truncated or damaged); names the file."""


class SafetensorsFile:
  """Lazily reads the tensors of one ``.safetensors`` file (local or remote).

  The header is checked against the file's size when the file is opened, so a truncated or
  damaged file fails there, naming the file and the first tensor it cannot hold.
  """

  def __init__(self, path: str):
    self.path = str(path)
    with fsspec.open(self.path, "rb") as f:
      size = f.size if isinstance(getattr(f, "size", None), int) else f.seek(0, 2)
      f.seek(0)
      if size < 8:
        raise self._corrupt(f"it holds {size} bytes, fewer than the 8-byte header length")
      (header_len,) = struct.unpack("<Q", f.read(8))
      if header_len > size - 8:
        raise self._corrupt(f"its header claims {header_len} bytes, but the file holds {size}")
      try:
        header = json.loads(f.read(header_len))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise self._corrupt(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise self._corrupt("its header is not a JSON object")
    header.pop("__metadata__", None)
    self.header = header
    self._data_start = 8 + header_len
    self._check(size - self._data_start)
    self._mmap = None
    if is_local(self.path):
      self._mmap = np.memmap(self.path.removeprefix("file://"), dtype=np.uint8, mode="r")

  def _corrupt(self, why: str) -> CorruptFileError:
    return CorruptFileError(f"{self.path} is truncated or corrupt: {why}; copy or download it "
                            "again.")

  def _check(self, data_bytes: int) -> None:
    """Every tensor's byte range fits its shape and dtype and lies inside the file."""
    for name, info in self.header.items():
      try:
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = (int(o) for o in info["data_offsets"])
        count = int(np.prod(info["shape"], dtype=np.int64))
      except (KeyError, TypeError, ValueError):
        raise self._corrupt(f"the header entry of tensor {name!r} is malformed ({info!r:.200})")
      if end - start != count * dtype.itemsize or start < 0:
        raise self._corrupt(
            f"tensor {name!r} of shape {info['shape']} {info['dtype']} needs "
            f"{count * dtype.itemsize} bytes, but its header gives it {end - start}")
      if end > data_bytes:
        raise self._corrupt(
            f"tensor {name!r} ends at byte {end} of the data, but the file holds {data_bytes} "
            "bytes of data")

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


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_safetensors(
    path: str,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> None:
  """Writes named arrays as one ``.safetensors`` file with the ``safetensors`` library.

  The library writes straight from the arrays' buffers (no serialized copy in memory). A local
  file is written under a temporary name and renamed into place, so an interrupted save never
  leaves a truncated file under the final name; a remote one (gs://) is written locally first
  and uploaded whole.

  Args:
    path: the file (local path or fsspec URL).
    tensors: ``{name: array}`` or ``(name, array)`` pairs; arrays of any dtype in ``_DTYPES``.
    metadata: the header's ``__metadata__`` (default ``{"format": "pt"}``, which transformers
      expects).
  """
  from safetensors.numpy import save_file

  arrays = {name: np.ascontiguousarray(a) for name, a in dict(tensors).items()}
  metadata = metadata or {"format": "pt"}
  if is_local(path):
    local = str(path).removeprefix("file://")
    tmp = f"{local}.tmp"
    save_file(arrays, tmp, metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # The library creates the file owner-only.
    os.replace(tmp, local)
    return
  fd, tmp = tempfile.mkstemp(suffix=".safetensors")
  os.close(fd)
  try:
    save_file(arrays, tmp, metadata=metadata)
    fs, remote = fsspec.core.url_to_fs(path)
    fs.put_file(tmp, remote)
  finally:
    os.remove(tmp)
