"""Objectives against METHOD.md's formulas in NumPy: values and gradients w.r.t. the logits."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tropd_jax import objectives
from tropd_jax.objectives import ObjectiveConfig

B, T, V, K = 2, 7, 11, 4


# ---------------------------------------------------------------- NumPy reference (METHOD.md §1–§6)


def _log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _take(x, ids):
  return np.take_along_axis(x, ids, -1)


def np_stats(zs, zt, tokens, k):
  ls, lt = _log_softmax(zs), _log_softmax(zt)
  ids = np.argsort(-lt, axis=-1, kind="stable")[..., :k]
  in_k = np.zeros(zs.shape, bool)
  np.put_along_axis(in_k, ids, True, -1)
  tail = lambda l: np.log(np.where(in_k, 0.0, np.exp(l)).sum(-1))
  entropy = lambda l: -(np.exp(l) * l).sum(-1)
  return dict(
      ls=ls, ids=ids, in_k=in_k,
      s=_take(ls, tokens[..., None])[..., 0], tau=_take(lt, tokens[..., None])[..., 0],
      sK=_take(ls, ids), tK=_take(lt, ids), s_tail=tail(ls), t_tail=tail(lt),
      Hs=entropy(ls), Ht=entropy(lt),
  )


def np_pg(adv, s, old, eps):
  """(loss, d loss / d s) of OPD's `−A·ratio`, PPO-clipped when `old` is given."""
  if old is None:
    return -adv, -adv
  r = np.exp(s - old)
  unclipped, clipped = r * adv, np.clip(r, 1 - eps, 1 + eps) * adv
  return -np.minimum(unclipped, clipped), np.where(unclipped <= clipped, -adv * r, 0.0)


def np_fkl(st, cfg, s, old):
  """(loss, d/ds, d/dsK, d/dtail) of the §3 forward KL in cfg's support and mode."""
  if cfg.fkl_support == "topk":
    lp = _log_softmax(st["tK"])
    value, g_K, g_tail = (np.exp(lp) * (lp - st["sK"])).sum(-1), -np.exp(lp), 0 * s
  else:
    p, p_tail = np.exp(st["tK"]), np.exp(st["t_tail"])
    value = (p * (st["tK"] - st["sK"])).sum(-1) + p_tail * (st["t_tail"] - st["s_tail"])
    g_K, g_tail = -p, -p_tail
  if cfg.fkl_mode == "advantage":
    loss, g_s = np_pg(-value, s, old, cfg.clip_eps)
    return loss, g_s, 0 * g_K, 0 * s
  return value, 0 * s, g_K, g_tail


def np_objective(cfg, st, u, completion, prefix, old=None):
  """Per-token (loss, d/ds, d/dsK, d/dtail) of objective cfg on completion (+ prefix) tokens."""
  s, tau = st["s"], st["tau"]
  sbar = s if old is None else old
  adv = tau - sbar
  opd, g_opd = np_pg(adv, s, old, cfg.clip_eps)
  zero, zero_K = 0 * s, 0 * st["sK"]
  name = cfg.name
  if name == "opd":
    out = (opd, g_opd, zero_K, zero)
  elif name in ("tropd", "fkl_outlier", "clip_outlier", "mask_outlier"):
    trust = u < np.minimum(np.exp(adv), 1) if cfg.region == "bernoulli" else adv > cfg.log_tau
    if cfg.outlier == "mask":
      outlier = (zero, zero, zero_K, zero)
    elif cfg.outlier == "clip":
      outlier = (*np_pg(np.maximum(adv, cfg.log_tau), s, old, cfg.clip_eps), zero_K, zero)
    else:
      outlier = np_fkl(st, cfg, s, old)
    inside = (opd, g_opd, zero_K, zero)
    out = tuple(
        np.where(trust[..., None] if a.ndim == 3 else trust, a, b) for a, b in zip(inside, outlier)
    )
  elif name == "topk_fkl":
    out = np_fkl(st, cfg, s, old)
  elif name == "jsd":
    b = cfg.jsd_beta
    lp = _log_softmax(st["tK"])
    mix_K = b * np.exp(st["tK"]) + (1 - b) * np.exp(st["sK"])
    topk = b * (np.exp(lp) * (lp - np.log(mix_K))).sum(-1)
    g_K = -b * np.exp(lp) * (1 - b) * np.exp(st["sK"]) / mix_K
    token, g_s = np_pg(-(1 - b) * (sbar - np.log(b * np.exp(tau) + (1 - b) * np.exp(sbar))), s, old,
                       cfg.clip_eps)
    out = (topk + token, g_s, g_K, zero)
  elif name == "entropy_opd":
    ranked = np.sort(st["Hs"][completion])[::-1]
    threshold = ranked[max(int(round(cfg.entropy_frac * completion.sum())), 1) - 1]
    keep = st["Hs"] >= threshold
    out = (keep * opd, keep * g_opd, zero_K, zero)
  elif name == "eopd":
    high = st["Ht"] > cfg.entropy_tau
    fkl = np_fkl(st, cfg, s, old)
    out = (opd + high * fkl[0], g_opd + high * fkl[1], high[..., None] * fkl[2], high * fkl[3])
  out = tuple(np.where(completion[..., None] if a.ndim == 3 else completion, a, 0.0) for a in out)
  if cfg.guidance:
    out = (out[0] + prefix * cfg.beta * (tau - s), out[1] - prefix * cfg.beta, out[2], out[3])
  return out


def np_loss_and_grad(cfg, zs, zt, tokens, u, completion, prefix, old=None):
  """Token-mean loss over response tokens and its gradient w.r.t. the student logits."""
  st = np_stats(zs, zt, tokens, cfg.top_k)
  loss, g_s, g_K, g_tail = np_objective(cfg, st, u, completion, prefix, old)
  n = (completion | prefix).sum()
  p = np.exp(st["ls"])
  onehot = np.zeros(p.shape)
  np.put_along_axis(onehot, tokens[..., None], 1.0, -1)
  scatter_K = np.zeros(p.shape)
  np.put_along_axis(scatter_K, st["ids"], g_K, -1)
  q = np.where(st["in_k"], 0.0, p)
  q /= q.sum(-1, keepdims=True)
  grad = (
      g_s[..., None] * (onehot - p)
      + scatter_K - g_K.sum(-1, keepdims=True) * p
      + g_tail[..., None] * (q - p)
  )
  return loss.sum() / n, grad / n


# ---------------------------------------------------------------- JAX under test


def jax_loss(cfg, zs, zt, tokens, u, completion, prefix, old=None):
  stats = objectives.token_stats(
      zs, zt, tokens, cfg.top_k, completion_mask_BT=completion, prefix_mask_BT=prefix
  )
  loss_BT, metrics = objectives.per_token_loss(stats, u, cfg, old)
  return objectives.token_mean(loss_BT, stats.loss_mask), (loss_BT, metrics)


def random_inputs(seed=0):
  rng = np.random.default_rng(seed)
  zs = 3.0 * rng.normal(size=(B, T, V))
  zt = 3.0 * rng.normal(size=(B, T, V))
  tokens = rng.integers(0, V, (B, T))
  u = rng.uniform(size=(B, T))
  completion = np.ones((B, T), bool)
  completion[0, -2:] = False  # padding
  prefix = np.zeros((B, T), bool)
  prefix[1, :2] = True  # a guided rollout's teacher prefix
  completion[1, :2] = False
  return zs, zt, tokens, u, completion, prefix


CONFIGS = [
    ObjectiveConfig.preset("opd"),
    ObjectiveConfig.preset("tropd"),
    ObjectiveConfig.preset("tropd", fkl_support="topk_tail"),
    ObjectiveConfig.preset("tropd", fkl_mode="advantage"),
    ObjectiveConfig.preset("tropd", outlier="clip"),
    ObjectiveConfig.preset("fkl_outlier"),
    ObjectiveConfig.preset("clip_outlier"),
    ObjectiveConfig.preset("mask_outlier"),
    ObjectiveConfig.preset("clip_outlier", region="bernoulli"),
    ObjectiveConfig.preset("mask_outlier", region="bernoulli"),
    ObjectiveConfig.preset("topk_fkl"),
    ObjectiveConfig.preset("topk_fkl", fkl_support="topk_tail"),
    ObjectiveConfig.preset("jsd"),
    ObjectiveConfig.preset("entropy_opd"),
    ObjectiveConfig.preset("eopd"),
    ObjectiveConfig.preset("opd", guidance=True, beta=0.1),
]


def _id(cfg):
  preset = ObjectiveConfig.preset(cfg.name)
  changed = {
      f.name: getattr(cfg, f.name)
      for f in dataclasses.fields(cfg)
      if getattr(cfg, f.name) != getattr(preset, f.name)
  }
  return cfg.name + "".join(f"-{k}={v}" for k, v in changed.items())


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("ppo", [False, True], ids=["first_update", "ppo"])
def test_matches_numpy(cfg, ppo):
  zs, zt, tokens, u, completion, prefix = random_inputs()
  cfg = dataclasses.replace(cfg, top_k=K)
  old = None
  if ppo:
    old = np_stats(zs, zt, tokens, K)["s"] + np.random.default_rng(1).normal(size=(B, T)) * 0.3
  want_loss, want_grad = np_loss_and_grad(cfg, zs, zt, tokens, u, completion, prefix, old)
  jnp_args = [jnp.asarray(x, jnp.float32) for x in (zs, zt)]
  (loss, _), grad = jax.value_and_grad(jax_loss, argnums=1, has_aux=True)(
      cfg, *jnp_args, tokens, jnp.asarray(u, jnp.float32), completion, prefix,
      None if old is None else jnp.asarray(old, jnp.float32),
  )
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


# Hand-picked inputs: B=1, T=4, V=5, K=2; position 0 is a teacher prefix token (β = 0.1).
# A = τ − s = [-0.95, -3.08, -0.39, -0.39]: position 1 falls outside both trust regions
# (P = 0.046 < u = 0.3, and A < log 0.1). E.g. opd = (3.08 + 0.39 + 0.39) / 4 response tokens,
# mask_outlier = (0.39 + 0.39) / 4, clip_outlier = (-log 0.1 + 0.39 + 0.39) / 4.
SMALL_ZS = np.array([[[1.0, 0.0, -1.0, 2.0, 0.5], [0.2, 0.1, 3.0, -2.0, 0.0],
                      [-1.0, 1.5, 0.0, 0.3, 0.7], [0.0, 0.0, 0.0, 0.0, 1.0]]])
SMALL_ZT = np.array([[[2.0, -1.0, 0.0, 1.0, 0.0], [0.0, 2.5, -0.5, -1.0, 0.3],
                      [1.0, 1.0, -0.5, 0.0, 0.2], [0.4, -0.3, 1.2, 0.0, 0.9]]])
SMALL_TOKENS = np.array([[3, 2, 1, 4]])
SMALL_U = np.array([[0.9, 0.3, 0.6, 0.1]])
SMALL_COMPLETION = np.array([[False, True, True, True]])
SMALL_PREFIX = np.array([[True, False, False, False]])

EXPECTED = {
    "opd": 0.9668393867358075,
    "tropd": 0.8586565158701503,
    "fkl_outlier": 0.8823891690249389,
    "clip_outlier": 0.7719209391304579,
    "mask_outlier": 0.19627466588194645,
    "topk_fkl": 1.2047995928453328,
    "jsd": 0.36203857245427856,
    "entropy_opd": 0.09844121363237876,
    "eopd": 1.4855244764381477,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hard_coded_small_case(name):
  cfg = ObjectiveConfig.preset(name, top_k=2, beta=0.1)
  args = (SMALL_ZS, SMALL_ZT, SMALL_TOKENS, SMALL_U, SMALL_COMPLETION, SMALL_PREFIX)
  np_loss, _ = np_loss_and_grad(cfg, *args)
  loss, _ = jax_loss(cfg, *(jnp.asarray(a, jnp.float32) if a.dtype == float else a for a in args))
  np.testing.assert_allclose(loss, EXPECTED[name], rtol=1e-6)
  np.testing.assert_allclose(np_loss, EXPECTED[name], rtol=1e-6)


@pytest.mark.parametrize("name", ["clip_outlier", "mask_outlier"])
def test_clip_and_mask_outlier_take_the_bernoulli_region(name):
  """``region="bernoulli"``: the outliers are TrOPD's `u ≥ min(πT/πθ, 1)`, not `A < log 0.1`."""
  zs, zt, tokens, u, completion, prefix = random_inputs(0)
  args = [jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), tokens,
          jnp.asarray(u, jnp.float32), completion, prefix]
  threshold = ObjectiveConfig.preset(name, top_k=K)
  bernoulli = ObjectiveConfig.preset(name, top_k=K, region="bernoulli")
  assert bernoulli.outlier == threshold.outlier and not bernoulli.guidance
  st = np_stats(zs, zt, tokens, K)
  adv = (st["tau"] - st["s"])[completion]
  in_bernoulli, in_threshold = u[completion] < np.minimum(np.exp(adv), 1), adv > math.log(0.1)
  assert np.any(in_bernoulli != in_threshold)  # The inputs tell the two regions apart.
  for cfg, inside in ((threshold, in_threshold), (bernoulli, in_bernoulli)):
    loss, (_, metrics) = jax_loss(cfg, *args)
    np.testing.assert_allclose(objectives.metric_means(metrics)["trust_frac"], inside.mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(loss, np_loss_and_grad(cfg, zs, zt, tokens, u, completion,
                                                      prefix)[0], rtol=1e-5)
  assert not np.isclose(jax_loss(threshold, *args)[0], jax_loss(bernoulli, *args)[0])


def test_every_objective_is_covered():
  assert set(EXPECTED) == set(objectives.OBJECTIVES)
  assert {cfg.name for cfg in CONFIGS} == set(objectives.OBJECTIVES)


# ---------------------------------------------------------------- aggregation and metrics


def test_micro_batches_aggregate_to_the_full_batch():
  zs, zt, tokens, u, completion, prefix = random_inputs()
  cfg = ObjectiveConfig.preset("tropd", top_k=K, beta=0.1)
  args = [jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), tokens,
          jnp.asarray(u, jnp.float32), completion, prefix]
  full_loss, (loss_BT, full_metrics) = jax_loss(cfg, *args)
  full_grad = jax.grad(lambda z: jax_loss(cfg, z, *args[1:])[0])(args[0])
  total_tokens = (completion | prefix).sum()

  def micro(rows):
    def loss(zs_rows):
      stats = objectives.token_stats(
          zs_rows, args[1][rows], args[2][rows], K,
          completion_mask_BT=completion[rows], prefix_mask_BT=prefix[rows])
      loss_BT, metrics = objectives.per_token_loss(stats, args[3][rows], cfg)
      return objectives.token_mean(loss_BT, stats.loss_mask, total_tokens), metrics
    return jax.value_and_grad(loss, has_aux=True)(args[0][rows])

  (loss_a, metrics_a), grad_a = micro(slice(0, 1))
  (loss_b, metrics_b), grad_b = micro(slice(1, 2))
  np.testing.assert_allclose(loss_a + loss_b, full_loss, rtol=1e-6)
  np.testing.assert_allclose(jnp.concatenate([grad_a, grad_b]), full_grad, rtol=1e-6, atol=1e-9)
  merged = objectives.metric_means(jax.tree.map(jnp.add, metrics_a, metrics_b))
  for name, value in objectives.metric_means(full_metrics).items():
    np.testing.assert_allclose(merged[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_metrics():
  zs, zt, tokens, u, completion, prefix = random_inputs()
  cfg = ObjectiveConfig.preset("tropd", top_k=K, beta=0.1)
  loss, (_, metrics) = jax_loss(cfg, jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32),
                                tokens, jnp.asarray(u, jnp.float32), completion, prefix)
  means = objectives.metric_means(metrics)
  st = np_stats(zs, zt, tokens, K)
  adv = (st["tau"] - st["s"])[completion]
  p_trust = np.minimum(np.exp(adv), 1)
  np.testing.assert_allclose(means["trust_frac"], np.mean(u[completion] < p_trust), rtol=1e-6)
  np.testing.assert_allclose(means["outlier_frac"], np.mean(u[completion] >= p_trust), rtol=1e-6)
  np.testing.assert_allclose(means["p_trust"], p_trust.mean(), rtol=1e-5)
  np.testing.assert_allclose(means["neg_k1"], adv.mean(), rtol=1e-5)
  teacher_topk_mass = np.exp(st["tK"]).sum(-1)[completion].mean()
  np.testing.assert_allclose(means["teacher_topk_mass"], teacher_topk_mass, rtol=1e-5)
  np.testing.assert_allclose(means["student_entropy"], st["Hs"][completion].mean(), rtol=1e-5)
  np.testing.assert_allclose(means["teacher_entropy"], st["Ht"][completion].mean(), rtol=1e-5)
  terms = sum(value for name, value in means.items() if name.startswith("loss/"))
  np.testing.assert_allclose(terms, loss, rtol=1e-5)
  assert set(means) >= {"loss/opd", "loss/outlier", "loss/guidance"}


def test_token_mean_ignores_padding_and_honours_the_denominator():
  loss_BT = jnp.array([[1.0, 2.0, jnp.nan], [4.0, 8.0, 16.0]])
  mask_BT = jnp.array([[True, True, False], [True, False, False]])
  assert objectives.token_mean(loss_BT, mask_BT) == pytest.approx(7.0 / 3)
  assert objectives.token_mean(loss_BT, mask_BT, 7) == pytest.approx(1.0)
  assert objectives.token_mean(loss_BT, jnp.zeros_like(mask_BT)) == 0.0


# ---------------------------------------------------------------- trust-region noise


def test_trust_noise_is_reproducible_and_independent_of_packing():
  key = jax.random.key(0)
  seq = jnp.repeat(jnp.arange(6)[:, None], 10, axis=1)
  pos = jnp.tile(jnp.arange(10)[None], (6, 1))
  u = objectives.trust_noise(key, 3, seq, pos)
  assert u.shape == (6, 10) and u.dtype == jnp.float32
  assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
  np.testing.assert_array_equal(u, objectives.trust_noise(jax.random.key(0), 3, seq, pos))
  np.testing.assert_array_equal(u[2:4], objectives.trust_noise(key, 3, seq[2:4], pos[2:4]))
  # Two sequences packed in one row draw what they draw alone.
  packed = objectives.trust_noise(key, 3, jnp.asarray([[1] * 4 + [4] * 6]),
                                  jnp.asarray([list(range(4)) + list(range(6))]))
  np.testing.assert_array_equal(packed[0, :4], u[1, :4])
  np.testing.assert_array_equal(packed[0, 4:], u[4, :6])
  np.testing.assert_array_equal(u, jax.jit(objectives.trust_noise)(key, 3, seq, pos))
  for other in (objectives.trust_noise(key, 4, seq, pos),
                objectives.trust_noise(jax.random.key(1), 3, seq, pos)):
    assert np.mean(np.asarray(other) == np.asarray(u)) < 0.05


def test_guidance_prefix_follows_the_cosine_and_leaves_out_the_stop_token():
  response, stops = (5, 6, 7, 8, 2), (2,)
  assert objectives.guidance_fraction(0, 40) == 1.0
  assert objectives.guidance_fraction(40, 40) == 0.0
  assert objectives.guidance_fraction(20, 40) == pytest.approx(0.5)
  assert objectives.guidance_prefix(response, 1.0, stops) == (5, 6, 7, 8)
  assert objectives.guidance_prefix(response, 0.5, stops) == (5, 6)
  assert objectives.guidance_prefix(response, 0.0, stops) == ()
  assert objectives.guidance_prefix((5, 6, 7), 1.0, stops) == (5, 6, 7)  # Truncated: nothing to drop.
  assert objectives.guidance_prefix(response, 1.0, stops, max_tokens=3) == (5, 6, 7)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name", sorted(objectives.OBJECTIVES))
def test_presets_validate_and_hash(name):
  cfg = ObjectiveConfig.preset(name)
  assert cfg.validate() is cfg
  assert hash(cfg) == hash(ObjectiveConfig.preset(name))
  assert cfg.guidance == (name == "tropd")


def test_presets_follow_the_paper():
  assert ObjectiveConfig.preset("tropd").region == "bernoulli"
  assert ObjectiveConfig.preset("tropd").outlier == "fkl"
  assert ObjectiveConfig.preset("clip_outlier").region == "threshold"
  assert ObjectiveConfig.preset("clip_outlier").outlier == "clip"
  assert ObjectiveConfig.preset("mask_outlier").outlier == "mask"
  assert ObjectiveConfig.preset("tropd").log_tau == pytest.approx(math.log(0.1))
  assert ObjectiveConfig.preset("tropd").beta == 0.001
  assert ObjectiveConfig.preset("tropd").top_k == 64


@pytest.mark.parametrize(
    "field, value",
    [("name", "ppo"), ("region", "box"), ("outlier", "drop"), ("fkl_support", "all"),
     ("fkl_mode", "reward"), ("top_k", 0), ("log_tau", 0.5), ("beta", -1.0), ("jsd_beta", 1.0),
     ("entropy_frac", 0.0), ("entropy_tau", -0.1), ("clip_eps", 0.0)],
)
def test_validate_names_the_bad_field(field, value):
  with pytest.raises(ValueError, match=f"{field}={value!r}"):
    dataclasses.replace(ObjectiveConfig.preset("tropd"), **{field: value}).validate()
