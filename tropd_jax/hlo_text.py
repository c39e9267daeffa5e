"""The text of a compiled XLA program (``compiled.as_text()``) as Python objects.

``parse_module`` turns HLO module text into ``Computation``s of ``Instruction``s, each with its
result shape as ``Array``s (dtype, per-device dims, memory space), its operands by name and its
attributes as text. ``infer_trip_count`` reads a while loop's trip count off its counter, as TPU
programs carry no ``known_trip_count``. ``hlo_cost`` builds on both.

The parser reads one instruction a line (long attributes may continue on the next lines) and
knows only the HLO text format, no XLA internals.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from collections.abc import Callable

# Bits per element of each HLO element type.
_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "f4e2m1fn": 4, "f8e3m4": 8, "f8e4m3": 8, "f8e4m3fn": 8,
    "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8, "f8e5m2": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8,
    "token": 0,
}
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](?:\{([^}]*)\})?")
_INSTR_RE = re.compile(r"\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_START_RE = re.compile(r"\s+(ROOT\s+)?%?[\w.\-]+\s*=\s*(\(|[a-z][a-z0-9]*\[)")  # name = shape
_OPCODE_RE = re.compile(r"\s*([\w\-]+)\(")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_OP_NAME_RE = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass(frozen=True)
class Array:
  """One array of a shape; ``memory_space`` 0 is HBM (1: TPU VMEM, 2: SMEM, 5: host).

  ``bytes`` is the logical size: tile padding of TPU layouts (``T(8,128)``) is not counted.
  """

  dtype: str
  dims: tuple[int, ...]
  memory_space: int = 0

  @property
  def bytes(self) -> int:
    return -(-math.prod(self.dims) * _BITS[self.dtype] // 8)


def parse_shape(text: str) -> tuple[Array, ...]:
  """The arrays of an HLO shape (a tuple's leaves in order): ``bf16[8,128]{1,0:T(8,128)}``."""
  arrays = []
  for dtype, dims, layout in _ARRAY_RE.findall(text):
    if dtype not in _BITS:
      raise ValueError(f"HLO element type {dtype!r} in {text!r} is unknown to hlo_text._BITS.")
    space = re.search(r"S\((\d+)\)", layout)
    arrays.append(Array(dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d),
                        int(space.group(1)) if space else 0))
  return tuple(arrays)


def nbytes(arrays, hbm_only: bool = False) -> int:
  """Bytes of ``arrays``; with ``hbm_only``, of those in HBM (memory space 0)."""
  return sum(a.bytes for a in arrays if not (hbm_only and a.memory_space))


def _close(text: str, start: int) -> int:
  """Index of the bracket closing the one at ``start``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if not depth:
        return i
  raise ValueError(f"unbalanced brackets in HLO: {text[start:start + 200]!r}")


def _split_top(text: str) -> list[str]:
  """``text`` split at the commas outside brackets."""
  parts, depth, last = [], 0, 0
  for i, ch in enumerate(text):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and not depth:
      parts.append(text[last:i])
      last = i + 1
  parts.append(text[last:])
  return [p.strip() for p in parts if p.strip()]


@dataclasses.dataclass
class Instruction:
  """One HLO instruction: ``%name = shape opcode(operands), attrs``.

  ``operands`` are the names of operand instructions; ``args`` is the raw operand text (a
  constant's literal, a parameter's number).
  """

  name: str
  opcode: str
  shape: tuple[Array, ...]
  operands: tuple[str, ...]
  args: str
  attrs: str

  def called(self, key: str) -> list[str]:
    """Computations named by attribute ``key`` (``calls``, ``body``, ``branch_computations``)."""
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attrs)
    return re.findall(r"%?([\w.\-]+)", m.group(1)) if m else []

  def int_attr(self, key: str, default: int | None = None) -> int | None:
    m = re.search(rf"\b{key}=(-?\d+)", self.attrs)
    return int(m.group(1)) if m else default

  @property
  def op_name(self) -> str:
    m = _OP_NAME_RE.search(self.attrs)
    return m.group(1) if m else ""


def _parse_instruction(text: str) -> tuple[Instruction, bool]:
  text = _COMMENT_RE.sub("", text)
  m = _INSTR_RE.match(text)
  pos = m.end()
  if text.startswith("(", pos):  # a tuple shape
    end = _close(text, pos) + 1
  else:
    end = text.index(" ", pos)
  shape = parse_shape(text[pos:end])
  op = _OPCODE_RE.match(text, end)
  if not op:
    raise ValueError(f"cannot parse HLO instruction {text[:200]!r}")
  close = _close(text, op.end() - 1)
  args = text[op.end():close]
  operands = () if op.group(1) in ("constant", "parameter") else tuple(
      re.search(r"%?([\w.\-]+)$", p).group(1) for p in _split_top(args))
  return Instruction(m.group(2), op.group(1), shape, operands, args, text[close + 1:]), bool(
      m.group(1))


class Computation:
  """A named list of instructions with a ROOT; ``users`` maps a name to its users."""

  def __init__(self, name: str, instructions: list[Instruction], root: Instruction):
    self.name, self.instructions, self.root = name, instructions, root
    self.by_name = {i.name: i for i in instructions}
    self.params = {int(i.args): i for i in instructions if i.opcode == "parameter"}

  def shape(self, name: str) -> tuple[Array, ...]:
    return self.by_name[name].shape

  @functools.cached_property
  def users(self) -> dict[str, list[Instruction]]:
    users = collections.defaultdict(list)
    for ins in self.instructions:
      for o in dict.fromkeys(ins.operands):
        users[o].append(ins)
    return users


@dataclasses.dataclass
class Module:
  computations: dict[str, Computation]
  entry: str
  num_devices: int  # partitions x replicas: the group of a collective without replica_groups

  def __getitem__(self, name: str) -> Computation:
    if name not in self.computations:
      raise ValueError(f"HLO computation {name!r} is referenced but not defined in the text.")
    return self.computations[name]


def parse_module(text: str) -> Module:
  """Parses the text of ``compiled.as_text()`` (or any HLO module text)."""
  comps, entry, current, pending = {}, None, None, []
  for line in text.splitlines():
    if current is None:
      if line[:1].strip() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
        words = line.split()
        is_entry = words[0] == "ENTRY"
        current = words[1 if is_entry else 0].lstrip("%").split("(")[0]
        entry = current if is_entry else entry
      continue
    # A computation ends with "}" (on TPU maybe '}, execution_thread="sparsecore"'), unless it
    # closes a long attribute of the last instruction.
    if line.startswith("}") and not (pending and pending[-1].count("{") > pending[-1].count("}")):
      parsed = [_parse_instruction(t) for t in pending]
      roots = [ins for ins, is_root in parsed if is_root]
      instructions = [ins for ins, _ in parsed]
      if instructions:
        comps[current] = Computation(current, instructions, (roots or instructions)[-1])
      current, pending = None, []
    elif _START_RE.match(line):
      pending.append(line)
    elif pending:  # a long attribute (kernel metadata) continues on the next lines
      pending[-1] += "\n" + line
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text().")
  header = re.search(r"^HloModule .*$", text, re.M)
  header = header.group(0) if header else ""
  sizes = [re.search(rf"\b{k}=(\d+)", header) for k in ("num_partitions", "replica_count")]
  return Module(comps, entry, math.prod(int(s.group(1)) for s in sizes if s))


# --- trip counts ---------------------------------------------------------------------------------

_STATE = "loop state"  # the value of a while body's or condition's parameter
_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "EQ": "EQ", "NE": "NE"}


def _value(module: Module, comp: Computation, name: str, env: Callable[[int], object]):
  """An integer scalar as an int, or ``("iv", k, c)``: element k of the loop state plus c.

  None when it is neither; ``env(i)`` is the value of parameter i of ``comp``.
  """
  ins = comp.by_name[name]
  op = ins.opcode
  if op == "parameter":
    return env(int(ins.args))
  if op == "constant":
    return int(ins.args) if re.fullmatch(r"\s*-?\d+\s*", ins.args) else None
  if op == "get-tuple-element":
    if _value(module, comp, ins.operands[0], env) is _STATE:
      return ("iv", ins.int_attr("index"), 0)
    return None
  if op in ("copy", "bitcast", "convert", "reshape"):
    return _value(module, comp, ins.operands[0], env)
  if op in ("add", "subtract"):
    a, b = (_value(module, comp, o, env) for o in ins.operands)
    sign = 1 if op == "add" else -1
    if isinstance(a, int) and isinstance(b, int):
      return a + sign * b
    if isinstance(a, tuple) and isinstance(b, int):
      return ("iv", a[1], a[2] + sign * b)
    if op == "add" and isinstance(a, int) and isinstance(b, tuple):
      return ("iv", b[1], b[2] + a)
    return None
  if op in ("fusion", "call"):
    called = module[(ins.called("calls") + ins.called("to_apply"))[0]]
    return _value(module, called, called.root.name,
                  lambda i: _value(module, comp, ins.operands[i], env))
  return None


def _conditions(module: Module, comp: Computation, name: str, env) -> list[tuple]:
  """The ``(k, c, direction, limit)`` tests ``state[k] + c <direction> limit`` that must all hold
  for the predicate ``name`` to be true; ``(None,)`` for a test of anything else."""
  ins = comp.by_name[name]
  if ins.opcode == "and":
    return [t for o in ins.operands for t in _conditions(module, comp, o, env)]
  if ins.opcode in ("fusion", "call"):
    called = module[(ins.called("calls") + ins.called("to_apply"))[0]]
    return _conditions(module, called, called.root.name,
                       lambda i: _value(module, comp, ins.operands[i], env))
  if ins.opcode == "copy":
    return _conditions(module, comp, ins.operands[0], env)
  if ins.opcode == "compare":
    direction = re.search(r"direction=(\w+)", ins.attrs).group(1)
    a, b = (_value(module, comp, o, env) for o in ins.operands)
    if isinstance(b, tuple) and isinstance(a, int):
      a, b, direction = b, a, _FLIP[direction]
    if isinstance(a, tuple) and isinstance(b, int):
      return [(a[1], a[2], direction, b)]
  return [(None,)]


def _iterations(start: int, step: int, direction: str, limit: int) -> int | None:
  """How many times ``start + i * step <direction> limit`` holds for i = 0, 1, ... in a row."""
  gap = limit - start
  if step > 0 and direction in ("LT", "LE"):
    return max(0, -(-gap // step) if direction == "LT" else gap // step + 1)
  if step < 0 and direction in ("GT", "GE"):
    return max(0, -(gap // step) if direction == "GT" else gap // step + 1)
  if direction == "NE" and gap % step == 0 and gap // step >= 0:
    return gap // step
  return None


def infer_trip_count(module: Module, comp: Computation,
                      ins: Instruction) -> tuple[int | None, int | None]:
  """``(trip count, None)`` of a counted loop, else ``(None, bound)`` (bound None if none).

  A counted loop's condition is one test of a state element that starts at a constant (in
  ``comp``, the caller) and that the body steps by a constant.
  """
  body, cond = module[ins.called("body")[0]], module[ins.called("condition")[0]]
  state = lambda i: _STATE  # noqa: E731
  init = comp.by_name[ins.operands[0]]
  counts = []
  tests = _conditions(module, cond, cond.root.name, state)
  for test in tests:
    if test[0] is None:
      continue
    k, c, direction, limit = test
    update = body.root.operands[k] if body.root.opcode == "tuple" else None
    step = update and _value(module, body, update, state)
    start = (_value(module, comp, init.operands[k], lambda i: None)
             if init.opcode == "tuple" else None)
    if isinstance(step, tuple) and step[1] == k and step[2] and isinstance(start, int):
      counts.append(_iterations(start + c, step[2], direction, limit))
  counts = [n for n in counts if n is not None]
  if len(tests) == 1 and counts:
    return counts[0], None
  return None, min(counts) if counts else None


