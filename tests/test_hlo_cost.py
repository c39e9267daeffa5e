"""hlo_cost: loop-aware flops, HBM bytes and collectives of compiled HLO text; the roofline."""

import importlib.util
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tropd_jax import hlo_cost

M, K, N = 16, 32, 48
MATMUL_FLOPS = 2 * M * K * N


def compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def xla_cost(c) -> dict:
  cost = c.cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def test_scan_counts_every_iteration_as_the_unrolled_program():
  x, w = jnp.ones((M, K)), jnp.ones((K, N))
  ws = jnp.ones((8, K, K))

  def scanned(x, ws, w):
    x, _ = jax.lax.scan(lambda c, wi: (c @ wi, None), x, ws)
    return x @ w

  def unrolled(x, ws, w):
    for i in range(8):
      x = x @ ws[i]
    return x @ w

  loop = hlo_cost.analyze(compiled(scanned, x, ws, w).as_text())
  flat = compiled(unrolled, x, ws, w)
  expected = 8 * 2 * M * K * K + MATMUL_FLOPS
  assert loop.flops == expected
  assert hlo_cost.analyze(flat.as_text()).flops == expected == xla_cost(flat)["flops"]
  (lp,) = loop.loops
  assert (lp.trip_count, lp.trip_source, lp.entries) == (8, "xla", 1)
  assert lp.flops == 2 * M * K * K
  # Each iteration reads one [K, K] slice of the stacked weights, not the whole stack.
  assert ws.nbytes / 8 < lp.hbm_bytes < ws.nbytes


def test_trip_count_read_off_the_loop_counter():
  """Without XLA's known_trip_count (as on TPU) the count comes from start, step and bound."""
  x, w = jnp.ones((M, K)), jnp.ones((K, K))

  def counted(x, w):
    return jax.lax.fori_loop(3, 10, lambda i, c: c @ w, x)

  text = compiled(counted, x, w).as_text()
  stripped = re.sub(r',?"known_trip_count":\{"n":"\d+"\}', "", text)
  assert stripped != text
  for t, source in ((text, "xla"), (stripped, "inferred")):
    cost = hlo_cost.analyze(t)
    assert [(lp.trip_count, lp.trip_source) for lp in cost.loops] == [(7, source)]
    assert cost.flops == 7 * 2 * M * K * K


def test_nested_loops_multiply():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))

  def nested(x, w):
    inner = lambda c, _: (c @ w, None)  # noqa: E731
    outer = lambda c, _: (jax.lax.scan(inner, c, None, length=4)[0], None)  # noqa: E731
    return jax.lax.scan(outer, x, None, length=3)[0]

  cost = hlo_cost.analyze(compiled(nested, x, w).as_text())
  assert cost.flops == 12 * 2 * M * K * K
  outer, inner = cost.loops
  assert (outer.trip_count, outer.entries, outer.loop_path) == (3, 1, ())
  assert (inner.trip_count, inner.entries, inner.loop_path) == (4, 3, (outer.name,))
  assert outer.flops == 4 * inner.flops == 4 * 2 * M * K * K


def test_data_dependent_loop_uses_unknown_trip_count():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))

  def until(x, w, n):
    return jax.lax.while_loop(lambda s: s[1] < n, lambda s: (s[0] @ w, s[1] + 1), (x, 0))[0]

  def bounded(x, w):  # stops when the values grow, and after 10 steps at most
    cond = lambda s: (s[1] < 10) & (s[0].sum() < 1e6)  # noqa: E731
    return jax.lax.while_loop(cond, lambda s: (s[0] @ w, s[1] + 1), (x, 0))[0]

  text = compiled(until, x, w, 3).as_text()
  one = hlo_cost.analyze(text)
  (lp,) = one.loops
  assert (lp.trip_count, lp.trip_source, lp.max_trip_count) == (1, "assumed", None)
  assert one.unknown_loops == [lp] and any(lp.name in n for n in one.notes)
  assert hlo_cost.analyze(text, unknown_trip_count=6).flops == 6 * one.flops
  assert hlo_cost.analyze(text, unknown_trip_count={lp.op_name: 4}).flops == 4 * one.flops
  assert hlo_cost.analyze(text, unknown_trip_count={lp.name: 2}).flops == 2 * one.flops
  with pytest.raises(ValueError, match=f"no entry for loop '{lp.name}'"):
    hlo_cost.analyze(text, unknown_trip_count={"while.999": 4})
  with pytest.raises(ValueError, match="non-negative int"):
    hlo_cost.analyze(text, unknown_trip_count=-1)

  seen = []
  text = compiled(bounded, x, w).as_text()
  cost = hlo_cost.analyze(text, unknown_trip_count=lambda *site: seen.append(site) or site[2])
  (lp,) = cost.loops
  assert (lp.trip_count, lp.trip_source, lp.max_trip_count) == (10, "assumed", 10)
  assert seen == [(lp.name, lp.op_name, 10)]
  assert cost.flops == 10 * 2 * M * K * K


def test_conditional_counts_its_costliest_branch():
  x, w = jnp.ones((M, K)), jnp.ones((K, N))

  def branchy(p, x, w):
    return jax.lax.cond(p, lambda: (x @ w) @ w.T, lambda: x * 2.0)

  cost = hlo_cost.analyze(compiled(branchy, True, x, w).as_text())
  assert cost.flops == 2 * MATMUL_FLOPS
  assert any(n.startswith("conditional") for n in cost.notes)


def test_hbm_bytes_of_a_loop_free_program_near_xla():
  x, w, b = jnp.ones((64, 256)), jnp.ones((256, 512)), jnp.ones((1, 512))
  c = compiled(lambda x, w, b: jax.nn.relu(x @ w + b), x, w, b)
  ours, xla = hlo_cost.analyze(c.as_text()).hbm_bytes, xla_cost(c)["bytes accessed"]
  # At least the arguments and the result move once.
  assert ours >= x.nbytes + w.nbytes + b.nbytes + 64 * 512 * 4
  assert xla / 2 <= ours <= 2 * xla


def fsdp_program(weight_spec: P):
  """x @ w_l for l in a scan over stacked weights [L, D, D], rows of x over 4 devices."""
  mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4])
  x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  ws = jax.ShapeDtypeStruct((3, 64, 64), jnp.float32, sharding=NamedSharding(mesh, weight_spec))

  def forward(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

  return hlo_cost.analyze(compiled(forward, x, ws).as_text())


def test_fsdp_weight_all_gather_is_found_inside_the_loop():
  cost = fsdp_program(P(None, "fsdp"))
  (lp,) = cost.loops
  gathers = hlo_cost.weight_collectives_in_loops(cost, min_bytes=64 * 64)
  assert [(c.kind, c.group_size, c.buffer_bytes, c.calls, c.loop_path) for c in gathers] == [
      ("all-gather", 4, 64 * 64 * 4, 3, (lp.name,))]
  assert gathers[0].bytes_per_call == 64 * 64 * 4 * 3 / 4
  assert not hlo_cost.weight_collectives_in_loops(cost, min_bytes=64 * 64 * 4)
  assert not hlo_cost.weight_collectives_in_loops(cost, 0, kinds=("all-reduce",))
  with pytest.raises(ValueError, match="all_gather"):
    hlo_cost.weight_collectives_in_loops(cost, 0, kinds=("all_gather",))
  assert "all-gather of 16.38 kB over 4" in hlo_cost.format_cost(cost, hlo_cost.CHIPS["TPU v4"])
  assert cost.collective_bytes >= 3 * gathers[0].bytes_per_call
  assert lp.collective_bytes >= gathers[0].bytes_per_call
  assert cost.flops == 3 * 2 * 4 * 64 * 64  # 4 of the 16 rows per device


def test_replicated_weights_need_no_collective_in_the_loop():
  cost = fsdp_program(P())
  assert not [c for c in cost.collectives if c.in_loop]
  assert not hlo_cost.weight_collectives_in_loops(cost, min_bytes=0)
  assert cost.loops[0].collective_bytes == 0


COLLECTIVES_HLO = "\n".join([
    "HloModule collectives, num_partitions=8",
    "",
    "%add (a: f32[], b: f32[]) -> f32[] {",
    "  %a = f32[] parameter(0)",
    "  %b = f32[] parameter(1)",
    "  ROOT %sum = f32[] add(%a, %b)",
    "}",
    "",
    "ENTRY %main (p: f32[1024]) -> (f32[1024], f32[256], f32[1024], f32[1024], f32[4096]) {",
    "  %p = f32[1024]{0} parameter(0)",
    "  %ar = f32[1024]{0} all-reduce(%p), channel_id=1, "
    "replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
    "  %rs = f32[256]{0} reduce-scatter(%p), channel_id=2, replica_groups=[2,4]<=[8], "
    "dimensions={0}, to_apply=%add",
    "  %a2a = f32[1024]{0} all-to-all(%p), channel_id=3, "
    "replica_groups=mesh['x'=2,'y'=4] {'x'}, dimensions={0}",
    "  %cp = f32[1024]{0} collective-permute(%p), channel_id=4, "
    "source_target_pairs={{0,1},{1,0}}",
    "  %ags = (f32[1024]{0}, f32[4096]{0}) all-gather-start(%p), channel_id=5, "
    "replica_groups=mesh['x'=8] {'x':(2)4}, dimensions={0}",
    "  %agd = f32[4096]{0} all-gather-done(%ags)",
    "  ROOT %t = (f32[1024]{0}, f32[256]{0}, f32[1024]{0}, f32[1024]{0}, f32[4096]{0}) "
    "tuple(%ar, %rs, %a2a, %cp, %agd)",
    "}",
])


def test_collective_bytes_and_replica_group_formats():
  cost = hlo_cost.analyze(COLLECTIVES_HLO)
  got = {c.kind: (c.name, c.group_size, c.bytes_per_call, c.calls) for c in cost.collectives}
  assert got == {
      "all-reduce": ("ar", 4, 2 * 4096 * 3 / 4, 1),
      "reduce-scatter": ("rs", 4, 4096 * 3 / 4, 1),
      "all-to-all": ("a2a", 2, 4096 / 2, 1),
      "collective-permute": ("cp", 2, 4096, 1),
      "all-gather": ("agd", 4, 16384 * 3 / 4, 1),  # the async pair, counted once
  }
  assert cost.collective_bytes == sum(b for _, _, b, _ in got.values())
  # Operands + results: 4 KiB in and 4/1/4/4/16 KiB out; the async pair once.
  assert cost.hbm_bytes == 5 * 4096 + (4096 + 1024 + 4096 + 4096 + 16384)


def test_dot_as_convolution_flops_exclude_padding():
  """TPU prints BTD,DNH->BTNH as a convolution whose N window slides over padding."""
  text = "\n".join([
      "HloModule conv",
      "",
      "ENTRY %main (x: bf16[2,263,32,1], w: bf16[32,4,128,1]) -> bf16[2,263,4,128] {",
      "  %x = bf16[2,263,32,1]{3,2,1,0:T(8,128)(2,1)} parameter(0)",
      "  %w = bf16[32,4,128,1]{3,2,1,0:T(8,128)(2,1)} parameter(1)",
      "  ROOT %c = bf16[2,263,4,128]{3,1,2,0:T(8,128)(2,1)S(1)} convolution(%x, %w), "
      "window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f",
      "}",
  ])
  cost = hlo_cost.analyze(text)
  assert cost.flops == 2 * (2 * 263) * 32 * (4 * 128)  # B·T rows, D in, N·H out
  assert cost.hbm_bytes == 2 * (2 * 263 * 32 + 32 * 4 * 128)  # the result is in VMEM: S(1)


KERNELS_HLO = "\n".join([
    "HloModule kernels",
    "",
    "ENTRY %main (q: bf16[2,128,64]) -> (bf16[2,128,64], bf16[2,128,64]) {",
    "  %q = bf16[2,128,64]{2,1,0} parameter(0)",
    # Kernel metadata continues on the next lines, as jax prints a Pallas call's.
    "  %k1 = bf16[2,128,64]{2,1,0} custom-call(%q), custom_call_target=\"tpu_custom_call\", "
    "frontend_attributes={kernel_metadata={",
    '"xprof_metadata":"{\\"block_q\\": 128}"',
    '}}, backend_config={"custom_call_config":{"body":"TUzv","cost_estimate":{"flops":"1000",'
    '"transcendentals":"0","bytes_accessed":"0"}}}',
    "  %splash.3 = bf16[2,128,64]{2,1,0} custom-call(%q), "
    'custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"TUzv"}}',
    "  ROOT %t = (bf16[2,128,64]{2,1,0}, /*index=1*/bf16[2,128,64]{2,1,0}) "
    "tuple(%k1, /*index=1*/%splash.3)",
    "}",
])


def test_pallas_kernels_count_their_cost_estimate_and_others_are_noted():
  cost = hlo_cost.analyze(KERNELS_HLO)
  assert cost.flops == 1000
  assert cost.hbm_bytes == 2 * (2 * 2 * 128 * 64 * 2)  # each reads q, writes its result
  assert any("tpu_custom_call:splash x1" in n for n in cost.notes)


THREADS_HLO = "\n".join([
    "HloModule threads",
    "",
    "%add_fusion (p0: f32[1024], p1: f32[1024]) -> f32[1024] {",
    "  %p0 = f32[1024]{0} parameter(0)",
    "  %p1 = f32[1024]{0} parameter(1)",
    "  ROOT %sum = f32[1024]{0} add(%p0, %p1)",
    "}",
    "",
    "%offloaded (a: f32[1024]) -> f32[1024] {",
    "  %a = f32[1024]{0} parameter(0)",
    "  ROOT %f = f32[1024]{0} fusion(%a, %a), kind=kLoop, calls=%add_fusion",
    '}, execution_thread="sparsecore"',
    "",
    "ENTRY %main (x: f32[1024], w: f32[1024,256]) -> f32[256] {",
    "  %x = f32[1024]{0} parameter(0)",
    "  %w = f32[1024,256]{1,0} parameter(1)",
    "  %cs = ((f32[1024]{0}), f32[1024]{0}) call-start(%x), "
    'async_execution_thread="sparsecore", to_apply=%offloaded',
    "  %cd = f32[1024]{0} call-done(%cs)",
    "  ROOT %d = f32[256]{0} dot(%cd, %w), lhs_contracting_dims={0}, rhs_contracting_dims={0}",
    "}",
])


def test_async_call_to_another_execution_thread():
  """TPU offloads work to its SparseCore as call-start/call-done of a computation on a thread."""
  cost = hlo_cost.analyze(THREADS_HLO)
  assert cost.flops == 2 * 1024 * 256
  assert cost.hbm_bytes == (2 * 4096 + 4096) + (4096 + 1024 * 256 * 4 + 256 * 4)


def test_roofline():
  cost = hlo_cost.ProgramCost(flops=459e12, hbm_bytes=2 * 2765e9, collectives=[
      hlo_cost.Collective("all-gather", "ag", "", 100e9, 0, 4, 1)], loops=[], notes=[])
  est = hlo_cost.estimate_seconds(cost, hlo_cost.chip_spec("TPU v5"))
  assert (est.compute_s, est.hbm_s, est.collective_s) == pytest.approx((1.0, 2.0, 0.5))
  assert (est.bound_s, est.bound_by, est.serial_s) == (pytest.approx(2.0), "hbm",
                                                        pytest.approx(3.5))
  assert hlo_cost.chip_spec("TPU v5 lite").peak_flops == 197e12
  with pytest.raises(ValueError, match="'TPU v9'"):
    hlo_cost.chip_spec("TPU v9")


def test_command_line(tmp_path):
  path = tmp_path / "threads.hlo"
  path.write_text(THREADS_HLO)
  proc = subprocess.run([sys.executable, "-m", "tropd_jax.hlo_cost", str(path), "--chip=TPU v5"],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "per device: 524.29 kFLOP" in proc.stdout and "on v5p:" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: no TPU compiler")
def test_tpu_program_of_a_tiny_model():
  """A real TPU program: the loops have no known_trip_count, dots print as convolutions."""
  from flax import nnx

  from tropd_jax import aot, mesh as mesh_lib, models
  from tropd_jax import train_step as ts

  devices = aot.tpu_devices("v5e:2x2")
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(), devices)
  d, f, n, g, h, v, layers = 128, 256, 4, 2, 32, 256, 2
  cfg = models.ModelConfig(model_type="qwen3", vocab_size=v, d_model=d, d_ff=f,
                           num_layers=layers, num_heads=n, num_kv_heads=g, head_dim=h,
                           qk_norm=True, dtype="bfloat16")
  graphdef, state = ts.abstract_params(cfg, mesh)
  b, t, micro = 8, 64, 3

  def forward(state, tokens_BT):
    return nnx.merge(graphdef, state)(tokens_BT)

  def accumulated(state, tokens_MBT):
    body = lambda acc, tokens: (acc + forward(state, tokens).sum(), None)  # noqa: E731
    return jax.lax.scan(body, jnp.zeros(()), tokens_MBT)[0]

  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    one = compiled(forward, state, jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows))
    loop = compiled(accumulated, state, jax.ShapeDtypeStruct(
        (micro, b, t), jnp.int32, sharding=NamedSharding(mesh, P(None, ("data", "fsdp")))))
  text = loop.as_text()
  assert "known_trip_count" not in text and "convolution(" in text

  # Per token: q, k, v, o and the MLP; scores and values over all t keys; the vocabulary.
  per_token = layers * (2 * d * n * h + 4 * d * g * h + 2 * n * h * d + 6 * d * f
                        + 4 * t * n * h) + 2 * d * v
  single = hlo_cost.analyze(one.as_text())
  assert single.flops == per_token * b * t / len(devices)
  assert 0 < single.flops <= xla_cost(one)["flops"]  # XLA also counts elementwise flops
  assert single.hbm_bytes > 0 and single.collective_bytes > 0 and not single.loops

  cost = hlo_cost.analyze(text)
  (lp,) = cost.loops
  assert (lp.trip_count, lp.trip_source) == (micro, "inferred")
  assert cost.flops == micro * single.flops == micro * lp.flops
  assert cost.hbm_bytes > 0 and cost.collective_bytes > 0
  est = hlo_cost.estimate_seconds(cost, hlo_cost.chip_spec(devices[0].device_kind))
  assert est.bound_s > 0 and est.serial_s >= est.bound_s
  assert "loop" in hlo_cost.format_cost(cost, hlo_cost.chip_spec("TPU v5 lite"))
