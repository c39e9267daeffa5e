"""Per-token distillation objectives (METHOD.md §1–§6), selected by name, and their aggregation.

Every objective in `OBJECTIVES` is a pure function

    objective(stats, u_BT, cfg, old_logp_BT=None) -> (loss_BT, metrics)

of the `TokenStats` of a batch, the uniform noise of the trust-region draw (`trust_noise`), its
`ObjectiveConfig` and, when a batch is reused for several updates (`ppo_epochs > 1`), the
student's log-probs at rollout time. `loss_BT` is zero outside the sampled (completion) tokens;
`per_token_loss` adds the off-policy guidance term on teacher-prefix tokens. Gradients reach the
student only through `stats.student_logp`, `stats.student_topk_logp` and `stats.student_tail_logp`.

Aggregation. The loss is `token_mean(loss_BT, stats.loss_mask, denominator)`: a mean over all
response tokens. With gradient accumulation over micro-batches pass `denominator` = the
response-token count of the whole step, so the summed micro-batch gradients equal the full-batch
one. Metrics are `{name: (sum, count)}` pairs: add them leaf by leaf over micro-batches
(`jax.tree.map(jnp.add, a, b)`) and divide once with `metric_means`; the means of the `loss/*`
terms add up to the loss. Under `jit` on a sharded batch the sums are already global.

Shape key:
  B: batch   T: time (positions)   K: teacher top-k
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from tropd_jax.scoring import TokenStats, token_stats

__all__ = [
    "OBJECTIVES",
    "Metrics",
    "ObjectiveConfig",
    "metric_means",
    "guidance_fraction",
    "guidance_loss",
    "guidance_prefix",
    "per_token_loss",
    "token_mean",
    "token_stats",
    "trust_noise",
]

Metrics = dict[str, tuple[jax.Array, jax.Array]]

_CHOICES = {
    "region": ("bernoulli", "threshold"),
    "outlier": ("mask", "clip", "fkl"),
    "fkl_support": ("topk", "topk_tail"),
    "fkl_mode": ("loss", "advantage"),
}


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Which objective, and its constants. Frozen and hashable: safe as a static `jit` argument.

  Build the paper's settings with `ObjectiveConfig.preset(name)`; the field defaults alone are the
  trust-region family without guidance.

  Attributes:
    name: a key of `OBJECTIVES`.
    top_k: K, the teacher's top-k support of the forward-KL terms (the paper: 64).
    region: the trust region `M_t`: "bernoulli" (`u_t < min(πT/πθ, 1)`) or "threshold"
      (`A_t > log_tau`).
    outlier: the loss outside the region: "mask" (none), "clip" (OPD with `A_t` clipped below at
      `log_tau`) or "fkl" (top-k forward KL).
    log_tau: threshold of the "threshold" region and of "clip" (not in the paper; log 0.1).
    fkl_support: "topk" (teacher top-k renormalized) or "topk_tail" (top-k plus one tail bucket for
      the mass outside it, unnormalized: a KL over k + 1 outcomes).
    fkl_mode: "loss" (differentiate the forward KL) or "advantage" (the detached `−FKL_t` becomes
      the sampled token's policy-gradient advantage).
    guidance: add `β·(τ_t − s_t)` on teacher-prefix tokens (off-policy guidance, §4).
    beta: β of the guidance term (0.001).
    jsd_beta: β of `jsd`, the teacher's weight in the mixture `p_M` (0.5).
    entropy_frac: fraction of highest-student-entropy tokens trained by `entropy_opd` (0.2).
    entropy_tau: teacher entropy (nats) above which `eopd` adds the forward KL (not given by the
      paper; 1.0).
    clip_eps: PPO ratio clip when `old_logp_BT` is given (0.2).
  """

  name: str
  top_k: int = 64
  region: str = "bernoulli"
  outlier: str = "fkl"
  log_tau: float = math.log(0.1)
  fkl_support: str = "topk"
  fkl_mode: str = "loss"
  guidance: bool = False
  beta: float = 0.001
  jsd_beta: float = 0.5
  entropy_frac: float = 0.2
  entropy_tau: float = 1.0
  clip_eps: float = 0.2

  @classmethod
  def preset(cls, name: str, **overrides) -> ObjectiveConfig:
    """The paper's setting of objective `name` (METHOD.md §6), with `overrides`, validated."""
    return cls(name=name, **{**_PRESETS.get(name, {}), **overrides}).validate()

  def validate(self) -> ObjectiveConfig:
    """Returns self, or raises ValueError naming the first bad field and its value."""
    if self.name not in OBJECTIVES:
      raise ValueError(f"objective name={self.name!r} is not one of {sorted(OBJECTIVES)}.")
    for field, choices in _CHOICES.items():
      if getattr(self, field) not in choices:
        raise ValueError(f"objective {field}={getattr(self, field)!r} is not one of {choices}.")
    checks = {
        "top_k": (isinstance(self.top_k, int) and self.top_k >= 1, "an integer >= 1"),
        "log_tau": (math.isfinite(self.log_tau) and self.log_tau <= 0, "finite and <= 0"),
        "beta": (self.beta >= 0, ">= 0"),
        "jsd_beta": (0 < self.jsd_beta < 1, "in (0, 1)"),
        "entropy_frac": (0 < self.entropy_frac <= 1, "in (0, 1]"),
        "entropy_tau": (self.entropy_tau >= 0, ">= 0"),
        "clip_eps": (0 < self.clip_eps < 1, "in (0, 1)"),
    }
    for field, (ok, expected) in checks.items():
      if not ok:
        raise ValueError(f"objective {field}={getattr(self, field)!r} must be {expected}.")
    return self


_PRESETS = {
    "tropd": dict(region="bernoulli", outlier="fkl", guidance=True),
    "fkl_outlier": dict(region="bernoulli", outlier="fkl"),
    "clip_outlier": dict(region="threshold", outlier="clip"),
    "mask_outlier": dict(region="threshold", outlier="mask"),
}


def trust_noise(
    key: jax.Array, step: jax.Array | int, sequence_ids_BT: jax.Array, positions_BT: jax.Array
) -> jax.Array:
  """Uniform noise `u [B, T]` of the trust-region draw `M_t = [u_t < P_t]`.

  Each value comes from `key` folded with the step, the sequence's index in the step and the
  position in the sequence, so it is the same however sequences are packed into rows, split over
  devices or micro-batches, and on a resumed run; it changes with the seed and the step.

  Args:
    key: the run's trust-region key (raw uint32 or typed).
    step: the training step.
    sequence_ids_BT: [B, T] int index of each position's sequence in the step.
    positions_BT: [B, T] int each position's index in its sequence.

  Returns:
    [B, T] float32 in [0, 1).
  """
  step_key = jax.random.fold_in(key, step)

  def one(sequence_id, position):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(step_key, sequence_id),
                                                 position))

  return jax.vmap(jax.vmap(one))(sequence_ids_BT, positions_BT)


def guidance_fraction(step: int, total_steps: int) -> float:
  """α_i = (1 + cos(π i / S)) / 2: the teacher-prefix fraction at step i (§4).

  ``total_steps`` is the run's ``schedule_steps``; a run extended past it goes on with α = 0.
  """
  return (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2.0


def guidance_prefix(response: Sequence[int], alpha: float, stop_ids: Sequence[int],
                    max_tokens: int | None = None) -> tuple[int, ...]:
  """``y^T[:⌊α·|y^T|⌋]`` of a teacher response, its closing stop tokens left out of ``y^T``.

  A generated response ends with the end-of-turn token; a prefix that held it would have the
  student continue past the end of the turn. Without it, a full prefix (α = 1 at step 0) leaves
  the student to close the turn itself, as with a response read from the data. ``max_tokens``
  caps the prefix, so that a guided row's response (prefix and continuation) fits the same
  budget as any other row's.
  """
  end = len(response)
  while end and response[end - 1] in stop_ids:
    end -= 1
  length = int(alpha * end)
  if max_tokens is not None:
    length = min(length, max_tokens)
  return tuple(response[:length])


def token_mean(
    loss_BT: jax.Array, mask_BT: jax.Array, denominator: jax.Array | int | None = None
) -> jax.Array:
  """Sum of `loss_BT` over `mask_BT` tokens divided by their count, or by `denominator` if given.

  Pass `denominator` (the response-token count of the whole step, all micro-batches and devices)
  when accumulating gradients so that every token weighs the same.
  """
  total = jnp.sum(jnp.where(mask_BT, loss_BT, 0.0))
  if denominator is None:
    denominator = jnp.maximum(jnp.sum(mask_BT), 1)
  return total / denominator


def metric_means(metrics: Metrics) -> dict[str, jax.Array]:
  """`{name: sum / count}` from `(sum, count)` pairs (0 where nothing was counted)."""
  return {name: total / jnp.maximum(count, 1) for name, (total, count) in metrics.items()}


def _masked_sum(x_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  x_BT = jax.lax.stop_gradient(x_BT).astype(jnp.float32)
  return jnp.sum(jnp.where(mask_BT, x_BT, 0.0)), jnp.sum(mask_BT, dtype=jnp.int32)


def _rollout_logp(stats: TokenStats, old_logp_BT: jax.Array | None) -> jax.Array:
  """`s̄_t`: the rollout-time log-prob, or the current one detached on the first update."""
  logp_BT = stats.student_logp if old_logp_BT is None else old_logp_BT
  return jax.lax.stop_gradient(logp_BT)


def _policy_gradient(
    stats: TokenStats, old_logp_BT: jax.Array | None, adv_BT: jax.Array, cfg: ObjectiveConfig
) -> jax.Array:
  """`−A·exp(s − s̄)` (value `−A`, gradient `−A∇s`); PPO-clipped when `old_logp_BT` is given."""
  adv_BT = jax.lax.stop_gradient(adv_BT)
  logp_BT = stats.student_logp
  if old_logp_BT is None:
    return -adv_BT * jnp.exp(logp_BT - jax.lax.stop_gradient(logp_BT))
  ratio_BT = jnp.exp(logp_BT - jax.lax.stop_gradient(old_logp_BT))
  clipped_BT = jnp.clip(ratio_BT, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
  return -jnp.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)


def _forward_kl(stats: TokenStats, support: str) -> jax.Array:
  """[B, T] top-k forward KL from the teacher's view (§3), differentiable in the student's."""
  teacher_BTK = stats.teacher_topk_logp
  student_BTK = stats.student_topk_logp
  if support == "topk":
    teacher_BTK = teacher_BTK - jax.nn.logsumexp(teacher_BTK, axis=-1, keepdims=True)
    return jnp.sum(jnp.exp(teacher_BTK) * (teacher_BTK - student_BTK), axis=-1)
  topk_BT = jnp.sum(jnp.exp(teacher_BTK) * (teacher_BTK - student_BTK), axis=-1)
  tail_BT = jnp.exp(stats.teacher_tail_logp) * (stats.teacher_tail_logp - stats.student_tail_logp)
  return topk_BT + tail_BT


def _fkl_loss(
    stats: TokenStats, old_logp_BT: jax.Array | None, cfg: ObjectiveConfig
) -> jax.Array:
  """The forward-KL term in `cfg.fkl_mode`: the KL, or `−FKL` as the sampled token's advantage."""
  fkl_BT = _forward_kl(stats, cfg.fkl_support)
  if cfg.fkl_mode == "loss":
    return fkl_BT
  return _policy_gradient(stats, old_logp_BT, -fkl_BT, cfg)


def _region(u_BT: jax.Array, adv_BT: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
  """[B, T] bool trust-region mask `M_t` (§2)."""
  if cfg.region == "bernoulli":
    return u_BT < jnp.exp(jnp.minimum(adv_BT, 0.0))
  return adv_BT > cfg.log_tau


def _diagnostics(
    stats: TokenStats, u_BT: jax.Array, adv_BT: jax.Array, cfg: ObjectiveConfig
) -> Metrics:
  """The metrics every objective logs (METHOD.md §7), over completion tokens."""
  mask_BT = stats.completion_mask
  region_BT = _region(u_BT, adv_BT, cfg)
  topk_mass = lambda logp_BTK: jnp.sum(jnp.exp(logp_BTK), axis=-1)
  return {
      "trust_frac": _masked_sum(region_BT, mask_BT),
      "outlier_frac": _masked_sum(~region_BT, mask_BT),
      "p_trust": _masked_sum(jnp.exp(jnp.minimum(adv_BT, 0.0)), mask_BT),
      "neg_k1": _masked_sum(adv_BT, mask_BT),
      "teacher_topk_mass": _masked_sum(topk_mass(stats.teacher_topk_logp), mask_BT),
      "student_topk_mass": _masked_sum(topk_mass(stats.student_topk_logp), mask_BT),
      "teacher_entropy": _masked_sum(stats.teacher_entropy, mask_BT),
      "student_entropy": _masked_sum(stats.student_entropy, mask_BT),
  }


def _advantage_and_metrics(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None
) -> tuple[jax.Array, Metrics]:
  """`A_t = τ_t − s̄_t` (detached) and the shared diagnostics."""
  adv_BT = jax.lax.stop_gradient(stats.teacher_logp - _rollout_logp(stats, old_logp_BT))
  return adv_BT, _diagnostics(stats, u_BT, adv_BT, cfg)


def _finish(
    stats: TokenStats, metrics: Metrics, terms: dict[str, jax.Array]
) -> tuple[jax.Array, Metrics]:
  """Sums the completion-token `terms` into `loss_BT`; logs each as a mean over response tokens."""
  loss_BT = jnp.zeros(stats.completion_mask.shape, jnp.float32)
  for name, term_BT in terms.items():
    term_BT = jnp.where(stats.completion_mask, term_BT, 0.0)
    metrics[f"loss/{name}"] = _masked_sum(term_BT, stats.loss_mask)
    loss_BT = loss_BT + term_BT
  return loss_BT, metrics


def opd(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """§1: the K1 policy-gradient loss on every sampled token."""
  adv_BT, metrics = _advantage_and_metrics(stats, u_BT, cfg, old_logp_BT)
  return _finish(stats, metrics, {"opd": _policy_gradient(stats, old_logp_BT, adv_BT, cfg)})


def trust_region(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """§2–§3, §5: OPD inside the trust region `M_t`, the `cfg.outlier` strategy outside it.

  Serves `tropd`, `fkl_outlier`, `clip_outlier` and `mask_outlier`, which differ only in their
  config (`region`, `outlier`, `guidance`).
  """
  adv_BT, metrics = _advantage_and_metrics(stats, u_BT, cfg, old_logp_BT)
  region_BT = _region(u_BT, adv_BT, cfg)
  if cfg.outlier == "mask":
    outlier_BT = jnp.zeros(adv_BT.shape, jnp.float32)
  elif cfg.outlier == "clip":
    outlier_BT = _policy_gradient(stats, old_logp_BT, jnp.maximum(adv_BT, cfg.log_tau), cfg)
  else:
    outlier_BT = _fkl_loss(stats, old_logp_BT, cfg)
  terms = {
      "opd": jnp.where(region_BT, _policy_gradient(stats, old_logp_BT, adv_BT, cfg), 0.0),
      "outlier": jnp.where(region_BT, 0.0, outlier_BT),
  }
  return _finish(stats, metrics, terms)


def topk_fkl(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """§3 forward KL on every sampled token (the paper's collapsing negative control)."""
  _, metrics = _advantage_and_metrics(stats, u_BT, cfg, old_logp_BT)
  return _finish(stats, metrics, {"fkl": _fkl_loss(stats, old_logp_BT, cfg)})


def jsd(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """§6 JSD: `β·Σ_K p̂T log(p̂T/p_M) + (1−β)·(s_t − log p_M(y_t))`, `p_M = β πT + (1−β) πθ`.

  The top-k term is differentiated through the student's top-k log-probs; the sampled-token term,
  a one-sample estimate of `(1−β)·KL(πθ‖p_M)`, enters as the policy-gradient advantage
  `−(1−β)(s̄_t − log p̄_M(y_t))` like OPD's (its value is the formula's). Inside `p_M` the teacher
  is `πT` over the full vocabulary; the outer weight is the renormalized `p̂T`, as written.
  """
  _, metrics = _advantage_and_metrics(stats, u_BT, cfg, old_logp_BT)
  beta = cfg.jsd_beta
  teacher_BTK = stats.teacher_topk_logp
  log_phat_BTK = teacher_BTK - jax.nn.logsumexp(teacher_BTK, axis=-1, keepdims=True)
  log_mix_BTK = jnp.logaddexp(
      math.log(beta) + teacher_BTK, math.log1p(-beta) + stats.student_topk_logp
  )
  topk_BT = beta * jnp.sum(jnp.exp(log_phat_BTK) * (log_phat_BTK - log_mix_BTK), axis=-1)
  rollout_BT = _rollout_logp(stats, old_logp_BT)
  log_mix_BT = jnp.logaddexp(math.log(beta) + stats.teacher_logp, math.log1p(-beta) + rollout_BT)
  adv_BT = -(1 - beta) * (rollout_BT - log_mix_BT)
  token_BT = _policy_gradient(stats, old_logp_BT, adv_BT, cfg)
  return _finish(stats, metrics, {"jsd_topk": topk_BT, "jsd_token": token_BT})


def _top_fraction_threshold(x_BT: jax.Array, mask_BT: jax.Array, frac: float) -> jax.Array:
  """The smallest of the `round(frac·n)` (at least 1) largest masked values, n the mask count."""
  descending = -jnp.sort(jnp.where(mask_BT, -x_BT, jnp.inf).ravel())
  count = jnp.round(frac * jnp.sum(mask_BT)).astype(jnp.int32)
  return descending[jnp.maximum(count, 1) - 1]


def entropy_opd(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """§6: OPD only on the `cfg.entropy_frac` highest-student-entropy sampled tokens.

  The entropy threshold is taken over the tokens passed in: over the whole step's batch when called
  on it (one `jit` over all devices makes it global), per micro-batch when called per micro-batch.
  """
  adv_BT, metrics = _advantage_and_metrics(stats, u_BT, cfg, old_logp_BT)
  entropy_BT = stats.student_entropy
  threshold = _top_fraction_threshold(entropy_BT, stats.completion_mask, cfg.entropy_frac)
  selected_BT = entropy_BT >= threshold
  metrics["selected_frac"] = _masked_sum(selected_BT, stats.completion_mask)
  opd_BT = jnp.where(selected_BT, _policy_gradient(stats, old_logp_BT, adv_BT, cfg), 0.0)
  return _finish(stats, metrics, {"opd": opd_BT})


def eopd(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """§6: OPD everywhere, plus the forward KL where the teacher entropy exceeds `cfg.entropy_tau`."""
  adv_BT, metrics = _advantage_and_metrics(stats, u_BT, cfg, old_logp_BT)
  high_BT = stats.teacher_entropy > cfg.entropy_tau
  metrics["fkl_frac"] = _masked_sum(high_BT, stats.completion_mask)
  terms = {
      "opd": _policy_gradient(stats, old_logp_BT, adv_BT, cfg),
      "fkl": jnp.where(high_BT, _fkl_loss(stats, old_logp_BT, cfg), 0.0),
  }
  return _finish(stats, metrics, terms)


Objective = Callable[..., tuple[jax.Array, Metrics]]

OBJECTIVES: dict[str, Objective] = {
    "opd": opd,
    "tropd": trust_region,
    "fkl_outlier": trust_region,
    "clip_outlier": trust_region,
    "mask_outlier": trust_region,
    "topk_fkl": topk_fkl,
    "jsd": jsd,
    "entropy_opd": entropy_opd,
    "eopd": eopd,
}


def guidance_loss(stats: TokenStats, cfg: ObjectiveConfig) -> jax.Array:
  """§4: `β·(τ_t − s_t)` on teacher-prefix tokens, else 0.

  Its gradient `−β∇s_t` is that of `β·KL(πT‖πθ)` under the K1 estimator on teacher samples.
  """
  return jnp.where(stats.prefix_mask, cfg.beta * (stats.teacher_logp - stats.student_logp), 0.0)


def per_token_loss(
    stats: TokenStats, u_BT: jax.Array, cfg: ObjectiveConfig, old_logp_BT: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
  """The loss of every position under objective `cfg.name`, guidance included when `cfg.guidance`.

  Args:
    stats: `TokenStats` of the batch.
    u_BT: [B, T] uniform noise from `trust_noise` (read by the "bernoulli" region and its metrics).
    cfg: the objective's config.
    old_logp_BT: [B, T] rollout-time student log-probs from the training model, on updates after
      the first of a batch (PPO clip); None on the first.

  Returns:
    loss_BT: [B, T] float32 per-token loss, zero outside `stats.loss_mask`; reduce it with
      `token_mean(loss_BT, stats.loss_mask, denominator)`.
    metrics: `{name: (sum, count)}`; per-term losses `loss/*` are counted over response tokens so
      that their means add up to the loss, the other metrics over completion tokens.
  """
  loss_BT, metrics = OBJECTIVES[cfg.name](stats, u_BT, cfg, old_logp_BT)
  if cfg.guidance:
    guidance_BT = guidance_loss(stats, cfg)
    metrics["loss/guidance"] = _masked_sum(guidance_BT, stats.loss_mask)
    loss_BT = loss_BT + guidance_BT
  return loss_BT, metrics
