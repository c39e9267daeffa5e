"""What a compiled XLA program costs per device, read from its HLO text, and its roofline time.

``compiled.cost_analysis()`` counts a while loop's body once: it cannot say what a decode loop of
1,024 steps or a scan over 16 micro-batches costs. ``analyze(compiled.as_text())`` reads the
optimized, SPMD-partitioned HLO (every shape is one device's) and walks it from ENTRY, multiplying
each loop body by its trip count:

  trip counts   XLA's ``known_trip_count`` where the backend records it (CPU); else read from the
                loop (a counter that starts at a constant, steps by a constant and is compared with
                a constant: how TPU programs print scans); else ``unknown_trip_count`` (a loop that
                stops on data, like the decode loop; the bound its condition also has is reported).
  calls         a call, and an async call or computation (``call-start``, ``async-start``: the
                TPU's SparseCore offloads), cost what their computation costs.
  conditionals  the costliest branch (most flops, then HBM bytes), noted in ``notes``.
  flops         2·M·N·K of every dot and convolution, inside fusions too, and the cost estimate
                of a Pallas kernel that carries one. Elementwise flops are not counted, nor kernels
                without an estimate (the splash attention: listed in ``notes``).
  HBM bytes     operands + result of every executed top-level instruction (a fusion's own, not its
                insides), skipping parameter, tuple, get-tuple-element, bitcast, constant and the
                while/call/conditional wrappers. A slice, dynamic-slice or gather of a buffer reads
                the slice; an in-place dynamic-update-slice or scatter writes the update only; an
                array outside HBM (layout ``S(n)``, n > 0: TPU VMEM or SMEM, or host) costs
                nothing. Sizes are logical: the tile padding of TPU layouts is not counted.
  collectives   all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute (async
                ``-start``/``-done`` pairs once), with the bytes each device moves on the
                interconnect per call.

  cost = hlo_cost.analyze(compiled.as_text(), unknown_trip_count=max_new_tokens)
  hlo_cost.estimate_seconds(cost, hlo_cost.chip_spec(device.device_kind)).bound_s

  python -m tropd_jax.hlo_cost program.hlo --chip="TPU v5 lite" --unknown_trip_count=512
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping

from tropd_jax.hlo_text import (
    Array,
    Computation,
    Instruction,
    Module,
    infer_trip_count,
    nbytes,
    parse_module,
)

# --- costs ---------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Top-level instructions that move no data themselves.
_FREE = {
    "parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call",
    "conditional", "async-update", "async-done", "call-done", "after-all", "partition-id",
    "replica-id", "opt-barrier", "add-dependency", "domain", "send", "recv",
}
_SLICES = ("slice", "dynamic-slice", "gather")  # read only the part they return of operand 0
_IN_PLACE = ("dynamic-update-slice", "scatter")  # write only their update into operand 0


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the program.

  Attributes:
    kind: one of ``COLLECTIVES``.
    name: the HLO instruction (its ``-done`` half when asynchronous).
    op_name: the JAX operation it came from (HLO metadata), or ``""``.
    bytes_per_call: bytes each device sends/receives on the interconnect per call: all-gather
      out·(n-1)/n, reduce-scatter in·(n-1)/n, all-reduce 2·in·(n-1)/n, all-to-all in·(n-1)/n,
      collective-permute in (n = group_size).
    buffer_bytes: the larger of its input and output on one device (a gathered weight).
    group_size: devices per replica group.
    calls: executions per run of the program (trip counts multiplied in).
    loop_path: the while loops around it, outermost first; empty outside loops.
  """

  kind: str
  name: str
  op_name: str
  bytes_per_call: float
  buffer_bytes: int
  group_size: int
  calls: int
  loop_path: tuple[str, ...] = ()

  @property
  def in_loop(self) -> bool:
    return bool(self.loop_path)

  @property
  def total_bytes(self) -> float:
    return self.bytes_per_call * self.calls


@dataclasses.dataclass(frozen=True)
class Loop:
  """One while loop and what one iteration costs (body + condition, inner loops included).

  Attributes:
    name, op_name: the HLO ``while`` instruction and the JAX operation it came from.
    trip_count: iterations counted for it.
    trip_source: ``xla`` (XLA's known_trip_count), ``inferred`` (from the loop's counter) or
      ``assumed`` (data dependent: from ``unknown_trip_count``).
    max_trip_count: for an assumed count, the bound its condition also has, if any.
    entries: times the loop starts per run of the program.
    loop_path: the loops around it, outermost first.
    flops, hbm_bytes, collective_bytes: per iteration, per device.
  """

  name: str
  op_name: str
  trip_count: int
  trip_source: str
  max_trip_count: int | None
  entries: int
  loop_path: tuple[str, ...]
  flops: float
  hbm_bytes: float
  collective_bytes: float


@dataclasses.dataclass
class ProgramCost:
  """What one run of a program costs one device.

  Attributes:
    flops: dot and convolution flops (2·M·N·K), loops multiplied out.
    hbm_bytes: bytes read and written in HBM by executed top-level instructions.
    collectives: every collective instruction (``calls`` per run).
    loops: every while loop, outer loops before the loops inside them.
    notes: what the figures leave out or assume (conditionals, assumed trip counts, kernels
      without a cost estimate).
  """

  flops: float
  hbm_bytes: float
  collectives: list[Collective]
  loops: list[Loop]
  notes: list[str]

  @property
  def collective_bytes(self) -> float:
    """Bytes each device sends/receives on the interconnect per run."""
    return sum(c.total_bytes for c in self.collectives)

  @property
  def unknown_loops(self) -> list[Loop]:
    return [lp for lp in self.loops if lp.trip_source == "assumed"]


@dataclasses.dataclass
class _Cost:
  """Costs of one execution of a computation, as they accumulate."""

  flops: float = 0.0
  hbm: float = 0.0
  collectives: list[Collective] = dataclasses.field(default_factory=list)
  loops: list[Loop] = dataclasses.field(default_factory=list)
  notes: dict[str, None] = dataclasses.field(default_factory=dict)  # ordered, no repeats
  opaque: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def collective_bytes(self) -> float:
    return sum(c.total_bytes for c in self.collectives)

  def add(self, other: _Cost, times: int, loop: str | None = None) -> None:
    """Adds ``other`` run ``times`` times, inside while loop ``loop`` if given."""
    prefix = (loop,) if loop else ()
    self.flops += other.flops * times
    self.hbm += other.hbm * times
    self.collectives += [dataclasses.replace(c, calls=c.calls * times,
                                             loop_path=prefix + c.loop_path)
                         for c in other.collectives]
    self.loops += [dataclasses.replace(lp, entries=lp.entries * times,
                                       loop_path=prefix + lp.loop_path) for lp in other.loops]
    self.notes.update(other.notes)
    for key, n in other.opaque.items():
      self.opaque[key] += n * times


UnknownTripCount = int | Mapping[str, int] | Callable[[str, str, int | None], int]


def analyze(hlo_text: str, *, unknown_trip_count: UnknownTripCount = 1,
            uncounted_kernels: tuple[str, ...] = ()) -> ProgramCost:
  """Flops, HBM bytes, collectives and loops of one run of a compiled program, per device.

  Args:
    hlo_text: ``compiled.as_text()``: optimized HLO, after SPMD partitioning.
    unknown_trip_count: iterations of a loop whose trip count depends on data: one count for
      all; a mapping from the loop's instruction name (``while.35``) or op_name
      (``jit(decode)/while``) to a count; or a function ``(name, op_name, max_trip_count) ->
      count`` (``max_trip_count`` is the bound in the loop's condition, or None).
    uncounted_kernels: custom calls (instruction names starting with one of these) whose HBM
      traffic the caller counts itself: a paged-attention kernel reads only each row's live
      pages, not the whole pool its operands hold.

  Returns:
    The ``ProgramCost``; ``loops`` says which trip counts were assumed.
  """
  return _Walker(parse_module(hlo_text), unknown_trip_count, uncounted_kernels).run()


class _Walker:
  def __init__(self, module: Module, unknown_trip_count: UnknownTripCount,
               uncounted_kernels: tuple[str, ...] = ()):
    self.module, self.unknown = module, unknown_trip_count
    self.uncounted = tuple(uncounted_kernels)
    self.memo: dict[str, _Cost] = {}

  def run(self) -> ProgramCost:
    total = self.cost(self.module.entry)
    notes = list(total.notes)
    notes += [f"loop {lp.name} ({lp.op_name}): trip count depends on data; assumed "
              f"{lp.trip_count}" + (f" (at most {lp.max_trip_count})"
                                    if lp.max_trip_count is not None else "")
              for lp in total.loops if lp.trip_source == "assumed"]
    if total.opaque:
      kernels = ", ".join(f"{k} x{n}" for k, n in total.opaque.most_common())
      notes.append(f"custom calls without a cost estimate, flops not counted: {kernels}")
    notes.append("elementwise flops are not counted (dots and convolutions only)")
    return ProgramCost(total.flops, total.hbm, total.collectives, total.loops, notes)

  def cost(self, name: str) -> _Cost:
    """Costs of one execution of computation ``name`` (memoized)."""
    if name not in self.memo:
      comp, acc = self.module[name], _Cost()
      for ins in comp.instructions:
        self.instruction(comp, ins, acc)
      self.memo[name] = acc
    return self.memo[name]

  def instruction(self, comp: Computation, ins: Instruction, acc: _Cost) -> None:
    op = ins.opcode
    if op == "while":
      self.loop(comp, ins, acc)
    elif op == "conditional":
      branches = ins.called("branch_computations") or (
          ins.called("true_computation") + ins.called("false_computation"))
      costs = [self.cost(b) for b in branches]
      best = max(range(len(costs)), key=lambda i: (costs[i].flops, costs[i].hbm,
                                                   costs[i].collective_bytes))
      acc.add(costs[best], 1)
      acc.notes[f"conditional {ins.name} ({ins.op_name}): counted its costliest branch, "
                f"{best + 1} of {len(costs)}"] = None
    elif op in ("call", "call-start", "async-start"):  # the async ones count at their start
      for name in ins.called("to_apply") + ins.called("calls"):
        acc.add(self.cost(name), 1)
    elif op in _FREE or op.endswith("-start"):
      return
    elif op.endswith("-done"):  # an async pair runs once, as the op of its -start
      start = comp.by_name[ins.operands[0]]
      self.op(comp, op[:-len("-done")], ins.name, start.operands, ins.shape, start, acc)
    else:
      self.op(comp, op, ins.name, ins.operands, ins.shape, ins, acc)

  def op(self, comp: Computation, op: str, name: str, operands, result, ins: Instruction,
         acc: _Cost) -> None:
    """One executed instruction; ``ins`` carries its attributes (the -start of an async pair)."""
    fused = self.module[ins.called("calls")[0]] if op == "fusion" else None
    if op == "custom-call" and self.uncounted and name.startswith(self.uncounted):
      acc.notes[f"HBM traffic of {', '.join(self.uncounted)} kernels left to the caller"] = None
    else:
      acc.hbm += _traffic(comp, op, operands, result, fused)
    if fused is not None:
      acc.flops += self.fused_flops(fused.name)
      acc.collectives += [self.collective(c, i.opcode, i.name, i.operands, i.shape, i)
                          for c, i in self.fused_instructions(fused.name)
                          if i.opcode in COLLECTIVES]
    elif op in ("dot", "convolution"):
      acc.flops += _matmul_flops(comp, op, operands, result, ins)
    elif op == "custom-call":
      estimate = _kernel_flops(ins)
      if estimate is not None:
        acc.flops += estimate
      elif operands and any(a.dims for a in result):  # a kernel, not runtime plumbing
        target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
        target = target.group(1) if target else "?"
        kernel = re.sub(r"[.]\d+$", "", name)
        acc.opaque[f"{target}:{kernel}"] += 1
    if op in COLLECTIVES:
      acc.collectives.append(self.collective(comp, op, name, operands, result, ins))

  def fused_flops(self, name: str) -> float:
    """Flops of fused computation ``name`` (and of the fusions inside it)."""
    flops = 0.0
    for comp, ins in self.fused_instructions(name):
      if ins.opcode in ("dot", "convolution"):
        flops += _matmul_flops(comp, ins.opcode, ins.operands, ins.shape, ins)
      elif ins.opcode == "custom-call":
        flops += _kernel_flops(ins) or 0.0
    return flops

  def fused_instructions(self, name: str):
    """``(computation, instruction)`` of fused computation ``name``, nested fusions included."""
    comp = self.module[name]
    for ins in comp.instructions:
      yield comp, ins
      if ins.opcode in ("fusion", "call"):
        for inner in ins.called("calls") + ins.called("to_apply"):
          yield from self.fused_instructions(inner)

  def collective(self, comp: Computation, kind: str, name: str, operands, result,
                 ins: Instruction) -> Collective:
    """A collective of ``kind`` reading ``operands`` (names in ``comp``) into ``result``."""
    in_b = sum(nbytes(comp.shape(o)) for o in operands)
    out_b = nbytes(result)
    n = _group_size(ins, self.module.num_devices)
    share = (n - 1) / n
    wire = {"all-gather": out_b * share, "reduce-scatter": in_b * share,
            "all-reduce": 2 * in_b * share, "all-to-all": in_b * share,
            "collective-permute": in_b}[kind]
    return Collective(kind, name, ins.op_name, wire, max(in_b, out_b), n, 1)

  def loop(self, comp: Computation, ins: Instruction, acc: _Cost) -> None:
    (body,), (cond,) = ins.called("body"), ins.called("condition")
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    bound = None
    if known:
      trips, source = int(known.group(1)), "xla"
    else:
      trips, bound = infer_trip_count(self.module, comp, ins)
      source = "inferred"
      if trips is None:
        trips, source = self.assumed_trips(ins, bound), "assumed"
    body_cost, cond_cost = self.cost(body), self.cost(cond)
    step = _Cost()
    step.add(body_cost, 1)
    step.add(cond_cost, 1)
    acc.loops.append(Loop(ins.name, ins.op_name, trips, source, bound, 1, (), step.flops,
                          step.hbm, step.collective_bytes))
    acc.add(body_cost, trips, ins.name)
    acc.add(cond_cost, trips + 1, ins.name)  # the condition runs once more, to stop

  def assumed_trips(self, ins: Instruction, bound: int | None) -> int:
    unknown = self.unknown
    if callable(unknown):
      trips = unknown(ins.name, ins.op_name, bound)
    elif isinstance(unknown, Mapping):
      keys = [k for k in (ins.name, ins.op_name) if k in unknown]
      if not keys:
        raise ValueError(
            f"unknown_trip_count has no entry for loop {ins.name!r} (op_name {ins.op_name!r}), "
            f"whose trip count depends on data; add one under either name.")
      trips = unknown[keys[0]]
    else:
      trips = unknown
    if isinstance(trips, bool) or not isinstance(trips, int) or trips < 0:
      raise ValueError(f"unknown_trip_count for loop {ins.name!r} is {trips!r}; "
                       f"give a non-negative int.")
    return trips


def _traffic(comp: Computation, op: str, operands, result, fused: Computation | None) -> int:
  """HBM bytes an executed instruction reads and writes (``fused``: a fusion's computation)."""
  reads = 0
  for i, o in enumerate(operands):
    full = nbytes(comp.shape(o), hbm_only=True)
    if not full:
      continue
    if fused is not None:
      part = _param_read(fused, i)
    elif i == 0 and op in _SLICES:
      part = nbytes(result)
    elif i == 0 and op in _IN_PLACE:
      part = 0
    else:
      part = None
    reads += full if part is None else min(full, part)
  if fused is not None:
    root = fused.root
    outputs = [fused.by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    writes = 0
    for out, arrays in zip(outputs, _group(result, [o.shape for o in outputs])):
      while out.opcode == "bitcast":
        out = fused.by_name[out.operands[0]]
      writes += _written(fused, out.opcode, out.operands, arrays)
    return reads + writes
  return reads + _written(comp, op, operands, result)


def _written(comp: Computation, op: str, operands, arrays) -> int:
  written = nbytes(arrays, hbm_only=True)
  if op in _IN_PLACE and written:  # scatter(operand, indices, updates): the update is last
    return min(written, nbytes(comp.shape(operands[1 if op == "dynamic-update-slice" else -1])))
  return written


def _group(arrays: tuple[Array, ...], shapes: list[tuple[Array, ...]]):
  """``arrays`` split into consecutive groups as long as ``shapes``."""
  out, at = [], 0
  for s in shapes:
    out.append(arrays[at:at + len(s)])
    at += len(s)
  return out


def _param_read(fused: Computation, index: int) -> int | None:
  """Bytes a fusion reads of operand ``index``: only the slices its users take, or None (all)."""
  if index not in fused.params:
    return None
  reads, todo = 0, [fused.params[index].name]
  while todo:
    name = todo.pop()
    for user in fused.users[name]:
      if user.opcode == "bitcast":
        todo.append(user.name)
      elif user.operands.index(name) == 0 and user.opcode in _SLICES:
        reads += nbytes(user.shape)
      elif not (user.operands.index(name) == 0 and user.opcode in _IN_PLACE):
        return None
  return reads


def _matmul_flops(comp: Computation, op: str, operands, result, ins: Instruction) -> float:
  """2 x multiply-adds of a dot or a convolution (padding taps excluded)."""
  lhs = comp.shape(operands[0])[0].dims
  out = result[0].dims
  if op == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    contracted = [lhs[int(d)] for d in m.group(1).split(",") if d] if m else []
    return 2.0 * math.prod(out) * math.prod(contracted)
  rhs = comp.shape(operands[1])[0].dims
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not labels:
    raise ValueError(f"convolution {ins.name} has no dim_labels: {ins.attrs[:200]!r}")
  lhs_l, rhs_l, out_l = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  fields = dict(f.split("=") for f in window.group(1).split()) if window else {}

  def per_dim(key, default):
    return [v for v in fields[key].split("x")] if key in fields else [default] * len(out_l)

  stride, pad = per_dim("stride", "1"), per_dim("pad", "0_0")
  lhs_dil, rhs_dil = per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
  taps = 1
  for d in range(sum(c.isdigit() for c in out_l)):
    c = str(d)
    taps *= _valid_taps(lhs[lhs_l.index(c)], rhs[rhs_l.index(c)], out[out_l.index(c)],
                        int(stride[d]), int(pad[d].split("_")[0]), int(lhs_dil[d]),
                        int(rhs_dil[d]))
  macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps
  return 2.0 * macs


def _valid_taps(in_size, k_size, out_size, stride, pad_lo, lhs_dil, rhs_dil) -> int:
  """(output position, kernel position) pairs of one spatial dimension that read real input."""
  span = (in_size - 1) * lhs_dil + 1
  taps = 0
  for k in range(k_size):
    off = k * rhs_dil - pad_lo  # input position of output 0
    if lhs_dil == 1:
      first = max(0, -(off // stride))
      last = min(out_size - 1, (span - 1 - off) // stride)
      taps += max(0, last - first + 1)
    else:
      taps += sum(1 for o in range(out_size)
                  if 0 <= o * stride + off < span and (o * stride + off) % lhs_dil == 0)
  return taps


def _kernel_flops(ins: Instruction) -> float | None:
  """The flops a Pallas kernel declares (``pl.pallas_call(cost_estimate=...)``), if any."""
  m = re.search(r'"cost_estimate":\s*\{[^}]*?"flops":\s*"?(\d+)', ins.attrs)
  return float(m.group(1)) if m else None


def _group_size(ins: Instruction, num_devices: int) -> int:
  """Devices per replica group of a collective (all devices when it names no groups)."""
  attrs = ins.attrs
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
  if pairs:
    return len(set(re.findall(r"\d+", pairs.group(1))))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if mesh:  # mesh['x'=2,'y'=4] {'y'} or a sub-axis {'y':(2)2}
    sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    n = 1
    for axis, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", mesh.group(2)):
      n *= int(sub) if sub else sizes[axis]
    return n
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if iota:  # [groups,size]<=[devices]
    return math.prod(int(d) for d in iota.group(1).split(",")[1:])
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if listed:
    return len(listed.group(1).split(","))
  return num_devices



# --- chips and the roofline ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One TPU chip (= one JAX device: v4 and v5p in megacore mode).

  Attributes:
    name: the generation, e.g. ``v5p``.
    peak_flops: dense bf16 FLOP/s.
    hbm_bytes_per_s: HBM bandwidth.
    ici_bytes_per_s: collective bandwidth one chip achieves (an assumption, see ``CHIPS``).
    hbm_capacity: HBM bytes.
  """

  name: str
  peak_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  hbm_capacity: int


# Peak bf16 FLOP/s, HBM bandwidth and capacity per chip: Google Cloud's TPU pages
# (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e). ICI is an ASSUMPTION: the pages give each chip's
# bidirectional link bandwidth (v5e 400, v5p 1200, v6e 800 GB/s; v4: 1.1 PB/s all-reduce per
# 4096-chip pod, ~270 GB/s a chip), which one collective over one mesh axis, on a ring of a few
# links, does not reach. We take a conservative achieved bandwidth per chip (v4 100, v5e 100, v5p
# 200, v6e 180 GB/s); measure a step on real chips and adjust.
_GiB = 2**30
_V4 = ChipSpec("v4", 275e12, 1200e9, 100e9, 32 * _GiB)
_V5E = ChipSpec("v5e", 197e12, 819e9, 100e9, 16 * _GiB)
_V5P = ChipSpec("v5p", 459e12, 2765e9, 200e9, 95 * _GiB)
_V6E = ChipSpec("v6e", 918e12, 1638e9, 180e9, 32 * _GiB)
CHIPS: dict[str, ChipSpec] = {  # by jax ``device.device_kind``
    "TPU v4": _V4, "TPU v5 lite": _V5E, "TPU v5e": _V5E, "TPU v5": _V5P, "TPU v5p": _V5P,
    "TPU v6 lite": _V6E, "TPU v6e": _V6E,
}


def chip_spec(device_kind: str) -> ChipSpec:
  """The ``ChipSpec`` of a ``device.device_kind`` (e.g. ``TPU v5 lite``)."""
  if device_kind not in CHIPS:
    raise ValueError(f"device kind {device_kind!r} is not in hlo_cost.CHIPS "
                     f"(known: {', '.join(CHIPS)}); add its ChipSpec.")
  return CHIPS[device_kind]


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Seconds one run of a program takes on one chip, by the roofline.

  Attributes:
    compute_s: flops at peak.
    hbm_s: HBM bytes at full bandwidth.
    collective_s: interconnect bytes at the assumed collective bandwidth.
    bound_s: the largest of the three (everything overlapped): an optimistic time.
    bound_by: ``compute``, ``hbm`` or ``collective``.
    serial_s: their sum (nothing overlapped): a pessimistic time.
  """

  compute_s: float
  hbm_s: float
  collective_s: float
  bound_s: float
  bound_by: str
  serial_s: float


def estimate_seconds(cost: ProgramCost, chip: ChipSpec) -> Estimate:
  """The roofline time of ``cost`` on ``chip``."""
  parts = {"compute": cost.flops / chip.peak_flops, "hbm": cost.hbm_bytes / chip.hbm_bytes_per_s,
           "collective": cost.collective_bytes / chip.ici_bytes_per_s}
  bound_by = max(parts, key=parts.get)
  return Estimate(parts["compute"], parts["hbm"], parts["collective"], parts[bound_by], bound_by,
                  sum(parts.values()))


def weight_collectives_in_loops(cost: ProgramCost, min_bytes: float,
                                kinds: tuple[str, ...] = COLLECTIVES) -> list[Collective]:
  """Collectives of ``kinds`` inside while loops that move at least ``min_bytes`` per device per
  iteration (``bytes_per_call``): a weight all-gathered on every decode step shows up here."""
  unknown = set(kinds) - set(COLLECTIVES)
  if unknown:
    raise ValueError(f"kinds={kinds!r}: {sorted(unknown)} not among {COLLECTIVES}.")
  return [c for c in cost.collectives
          if c.in_loop and c.kind in kinds and c.bytes_per_call >= min_bytes]


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {prefix}{unit}"
  return f"{x:.0f} {unit}"


def format_cost(cost: ProgramCost, chip: ChipSpec | None = None, top: int = 8) -> str:
  """A readable summary: totals, loops, the largest collectives, the estimate on ``chip``."""
  lines = [f"per device: {_si(cost.flops, 'FLOP')}, HBM {_si(cost.hbm_bytes, 'B')}, "
           f"interconnect {_si(cost.collective_bytes, 'B')} in {len(cost.collectives)} "
           f"collectives"]
  for lp in cost.loops:
    depth = "  " * len(lp.loop_path)
    trips = f"{lp.trip_count} ({lp.trip_source}" + (
        f", at most {lp.max_trip_count})" if lp.max_trip_count is not None else ")")
    lines.append(f"  {depth}loop {lp.name} x{trips}, entered {lp.entries}x; per iteration "
                 f"{_si(lp.flops, 'FLOP')}, HBM {_si(lp.hbm_bytes, 'B')}, interconnect "
                 f"{_si(lp.collective_bytes, 'B')}  [{lp.op_name}]")
  for c in sorted(cost.collectives, key=lambda c: -c.total_bytes)[:top]:
    where = "/".join(c.loop_path) or "top level"
    lines.append(f"  {c.kind} of {_si(c.buffer_bytes, 'B')} over {c.group_size}: "
                 f"{_si(c.bytes_per_call, 'B')} x {c.calls} calls ({where})  [{c.op_name}]")
  if chip is not None:
    e = estimate_seconds(cost, chip)
    lines.append(f"on {chip.name}: compute {e.compute_s * 1e3:.3f} ms, HBM {e.hbm_s * 1e3:.3f} "
                 f"ms, collectives {e.collective_s * 1e3:.3f} ms -> {e.bound_s * 1e3:.3f} ms "
                 f"({e.bound_by}-bound; {e.serial_s * 1e3:.3f} ms if nothing overlaps)")
  lines += [f"note: {n}" for n in cost.notes]
  return "\n".join(lines)


def main(argv) -> None:
  for path in argv[1:]:
    with open(path) as f:
      cost = analyze(f.read(), unknown_trip_count=_UNKNOWN_TRIP_COUNT.value)
    print(f"{path}\n" + format_cost(cost, chip_spec(_CHIP.value) if _CHIP.value else None))


if __name__ == "__main__":
  from absl import app, flags

  _CHIP = flags.DEFINE_string("chip", None, f"device kind for a time estimate: {', '.join(CHIPS)}")
  _UNKNOWN_TRIP_COUNT = flags.DEFINE_integer(
      "unknown_trip_count", 1, "Iterations assumed for loops that stop on data (decode).")
  app.run(main)
