"""Data files as shards and units: found at a path, read a unit at a time, written whole.

A data path names JSONL or Parquet *shards* on any fsspec file system: one file, a directory
(every ``.jsonl`` / ``.parquet`` file below it) or a glob. Local paths, ``gs://`` URLs and the
hub, as ``hf://datasets/<org>/<name>[@<revision>]/<file-or-glob>``, all read the same way. A
*unit* is the piece read at once: a Parquet row group (so a process reads only the row groups
it needs) or a whole JSONL file.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import fsspec

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
"""File name endings read as data, and their format."""

HUB_PREFIX = "hf://datasets/"
_GLOB_CHARS = "*?["
_SHARD_BITS = 32  # A row's key is ``shard << 32 | row``: rows of one shard below 2**32.


@dataclasses.dataclass(frozen=True)
class Unit:
  """The piece of a shard read at once: a Parquet row group or a whole JSONL file.

  Attributes:
    shard: index of the shard in ``Source.shards``.
    group: the Parquet row group (0 for JSONL).
    first_row: row number in the shard of the unit's first row.
    rows: rows in the unit (None for JSONL, known once read).
  """

  shard: int
  group: int
  first_row: int
  rows: int | None = None


def format_of(path: str) -> str | None:
  """The format of a data file by its name (see ``FORMATS``), or None."""
  return next((fmt for ext, fmt in FORMATS.items() if path.endswith(ext)), None)


def _check_path(path: str) -> None:
  if path.startswith("hf://") and not path.startswith(HUB_PREFIX):
    raise ValueError(
        f"data path {path!r}: hub datasets are read as {HUB_PREFIX}<org>/<name>/<file-or-glob>, "
        f"e.g. {HUB_PREFIX}open-thoughts/OpenThoughts3-1.2M/data/train-*.parquet.")


class Source:
  """The shards at a data path, split into units, read one unit at a time.

  Attributes:
    path: the data path as given.
    shards: the data files, sorted (URLs for remote file systems).
    units: every unit of every shard, in shard and row-group order.
  """

  def __init__(self, path: str):
    _check_path(path)
    self.path = path
    self.fs, root = fsspec.core.url_to_fs(path)
    local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                       else (self.fs.protocol,))
    if any(c in root for c in _GLOB_CHARS):
      found = self.fs.glob(root, detail=True)
    elif self.fs.isdir(root):
      found = self.fs.find(root, detail=True)
    elif self.fs.exists(root):
      if format_of(root) is None:
        raise ValueError(f"data file {path!r} is neither {' nor '.join(FORMATS)}.")
      found = {root: {"type": "file"}}
    else:
      raise FileNotFoundError(
          f"data file or directory {path!r} does not exist; check data.train_path (python -m "
          "tropd_jax.prepare_prompts writes a prompt file).")
    self._paths = sorted(p for p, info in found.items()
                         if info.get("type") != "directory" and format_of(p))
    if not self._paths:
      raise FileNotFoundError(
          f"data path {path!r} holds no {' or '.join(FORMATS)} files; check data.train_path.")
    self.shards = [p if local else self.fs.unstrip_protocol(p) for p in self._paths]
    self._open: tuple[str, Any] | None = None  # The Parquet file read last.
    self.units: list[Unit] = []
    self._columns: list[set[str] | None] = []
    for shard, p in enumerate(self._paths):
      if format_of(p) == "jsonl":
        self.units.append(Unit(shard, 0, 0))
        self._columns.append(None)
        continue
      meta = self._parquet(p).metadata
      first = 0
      for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        self.units.append(Unit(shard, group, first, rows))
        first += rows
      self._columns.append(set(self._parquet(p).schema_arrow.names))

  def _parquet(self, p: str):
    import pyarrow.parquet as pq

    if self._open is None or self._open[0] != p:
      self._open = (p, pq.ParquetFile(self.fs.open(p, "rb")))
    return self._open[1]

  def columns(self, shard: int) -> set[str] | None:
    """The fields of a Parquet shard (None for JSONL, whose records may differ)."""
    return self._columns[shard]

  def key(self, unit: Unit, row: int) -> int:
    """The key of row ``row`` of ``unit``: ``shard << 32 | row in the shard``."""
    return (unit.shard << _SHARD_BITS) | (unit.first_row + row)

  def where(self, unit: Unit, row: int) -> str:
    """Names a row in messages: its shard and row number in the shard."""
    return f"{self.shards[unit.shard]} row {unit.first_row + row}"

  def num_rows(self) -> int:
    """Records at the path: Parquet from its metadata, JSONL by counting its non-blank lines."""
    total = 0
    for unit in self.units:
      if unit.rows is not None:
        total += unit.rows
      else:
        with self.fs.open(self._paths[unit.shard], "rt", encoding="utf-8") as f:
          total += sum(1 for line in f if line.strip())
    return total

  def read(self, unit: Unit, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The records of a unit in file order (only ``columns`` of a Parquet shard, if given).

    Raises:
      ValueError: a JSONL line is not a JSON object (the message names the line).
    """
    p = self._paths[unit.shard]
    if format_of(p) == "parquet":
      if columns is not None:
        columns = [c for c in columns if c in self._columns[unit.shard]]
      table = self._parquet(p).read_row_group(unit.group, columns=columns, use_threads=False)
      return table.to_pylist()
    records = []
    with self.fs.open(p, "rt", encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{self.shards[unit.shard]}:{line_no} is not valid JSON ({e.msg})."
                           ) from None
        if not isinstance(record, dict):
          raise ValueError(f"{self.shards[unit.shard]}:{line_no} is a JSON "
                           f"{type(record).__name__}, not an object.")
        records.append(record)
    return records

  def first_record(self) -> dict[str, Any] | None:
    """The first record of the data, read cheaply (a line or a row group); None if empty."""
    for unit in self.units:
      p = self._paths[unit.shard]
      if format_of(p) == "parquet":
        if unit.rows:
          return self.read(unit)[0]
        continue
      with self.fs.open(p, "rt", encoding="utf-8") as f:
        for line in f:
          if line.strip():
            try:
              return json.loads(line)
            except json.JSONDecodeError:
              return None  # ``read`` reports it with its line number.
    return None

  def check_field(self, field: str, config_field: str) -> None:
    """Fails early when a field the run needs is missing from the data.

    Checks the schema of every Parquet shard, and the first record of a JSONL source.
    """
    for shard, names in enumerate(self._columns):
      if names is not None and field not in names:
        raise KeyError(f"data file {self.shards[shard]} has no field {field!r} "
                       f"(fields: {sorted(names)}); set {config_field}.")
    if any(names is None for names in self._columns):
      record = self.first_record()
      if isinstance(record, dict) and field not in record:
        raise KeyError(f"the first record of {self.path!r} has no field {field!r} "
                       f"(fields: {sorted(record)}); set {config_field}.")


def write_new_file(path: str, write: Callable[[Any], None], *, text: bool = True) -> None:
  """Writes a file that does not exist yet, whole: under a temporary name, then renamed.

  Nothing is appended to or rewritten, so this works on every fsspec file system (object
  stores such as gs:// cannot append), and a failed write leaves no partial ``path``.

  Args:
    path: the file to create (local path or URL).
    write: called with the open file; writes the contents.
    text: open in text mode (UTF-8) rather than binary.

  Raises:
    FileExistsError: ``path`` exists; it is left as it was.
  """
  fs, root = fsspec.core.url_to_fs(path)
  if fs.exists(root):
    raise FileExistsError(f"{path} exists; it is not overwritten.")
  parent, _, name = root.rpartition("/")
  tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
  fs.makedirs(parent, exist_ok=True)
  with fs.open(tmp, "wt" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
    write(f)
  fs.mv(tmp, root)
