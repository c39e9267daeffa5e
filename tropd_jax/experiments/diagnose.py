"""Step-0 diagnosis: where the teacher finds the student's own rollouts unlikely, and how much of
OPD's gradient sits there.

  JAX_PLATFORMS=cpu python -m tropd_jax.experiments.diagnose --task=demo|tally \
      [--prompts=N] [--seed=0] [--out=FILE.json]

Samples the first step's on-policy rollouts as a training run does (the task config's prompts of
step 0 for ``--seed``, ``rollout.num_samples`` rows each, the run's sampler settings and
rollout seed, through ``tropd_jax.sampling``), scores every sampled token with the student and
the teacher (full float32 log-softmax of each), grades every rollout as the evaluation does
(``tropd_jax.math_grading``) and prints:

- the share of outlier tokens (``A_t = log πT − log πθ < log 0.1``, the teacher at most a tenth
  as likely as the student) among the tokens of correct and of wrong rollouts, and the share of
  all outlier tokens that lie in correct rollouts (choices that did not cost the answer);
- the share of correct and of wrong rollouts holding at least one outlier;
- the share of OPD's squared per-token gradient weight carried by the outliers, two ways:
  ``A_t²`` (the squared K1 advantage), and ``A_t² · ‖∇_z log πθ(y_t)‖²`` with ``z`` the
  student's logits at that position (``‖∇_z log p(y)‖² = 1 − 2 p(y) + Σ_v p(v)²``, the exact
  squared norm of the per-token gradient with respect to the logits, not the parameters).

Which regime a task is in: when outliers are rare in correct rollouts and carry the gradient of
wrong ones, they are the student's errors; when correct rollouts hold them as often, most of
them are harmless choices the teacher would not make.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

LOG_TAU = math.log(0.1)
PAD_MULTIPLE = 64  # Scored rows are padded to a multiple of this (few compilations).


@dataclasses.dataclass(frozen=True)
class RowScores:
  """The sampled tokens of one rollout, scored by both models.

  Attributes:
    adv: float32 [T_r] ``A_t = log πT(y_t) − log πθ(y_t)`` of each completion token.
    grad_sq: float32 [T_r] ``‖∇_z log πθ(y_t)‖²`` over the student's logits ``z``.
    correct: the rollout's boxed answer is right.
  """

  adv: np.ndarray
  grad_sq: np.ndarray
  correct: bool


def summarize(rows: list[RowScores], log_tau: float = LOG_TAU) -> dict[str, float]:
  """The diagnosis of scored rollouts (every share in [0, 1]; NaN where nothing is counted).

  Keys: ``rollouts``, ``accuracy``, ``mean_tokens``; ``outlier_tokens_correct`` and
  ``outlier_tokens_wrong`` (outlier share of the tokens of correct / wrong rollouts);
  ``outliers_in_correct`` (share of all outlier tokens that lie in correct rollouts);
  ``rollouts_with_outlier_correct`` and ``_wrong``; ``grad_share_adv2`` and
  ``grad_share_adv2_gradnorm2`` (the outliers' share of ``Σ A²`` and of ``Σ A²·‖∇_z‖²``).
  """
  if not rows:
    raise ValueError("no rollouts to diagnose.")
  share = lambda part, whole: float(part / whole) if whole else math.nan
  out = {"rollouts": len(rows), "accuracy": float(np.mean([r.correct for r in rows])),
         "mean_tokens": float(np.mean([len(r.adv) for r in rows]))}
  for name, correct in (("correct", True), ("wrong", False)):
    group = [r for r in rows if r.correct == correct]
    outliers = sum(int(np.sum(r.adv < log_tau)) for r in group)
    out[f"outlier_tokens_{name}"] = share(outliers, sum(len(r.adv) for r in group))
    out[f"rollouts_with_outlier_{name}"] = share(
        sum(bool(np.any(r.adv < log_tau)) for r in group), len(group))
  outliers_correct = sum(int(np.sum(r.adv < log_tau)) for r in rows if r.correct)
  out["outliers_in_correct"] = share(outliers_correct,
                                     sum(int(np.sum(r.adv < log_tau)) for r in rows))
  adv = np.concatenate([r.adv for r in rows]).astype(np.float64)
  grad_sq = np.concatenate([r.grad_sq for r in rows]).astype(np.float64)
  outlier = adv < log_tau
  for name, weight in (("adv2", adv**2), ("adv2_gradnorm2", adv**2 * grad_sq)):
    out[f"grad_share_{name}"] = share(weight[outlier].sum(), weight.sum())
  return out


def _token_scores(s_graphdef, s_params, t_graphdef, t_params, tokens_BT, valid_BT,
                  vocab_size: int):
  """``(log πθ(y), log πT(y), ‖∇_z log πθ(y)‖²)`` [B, T-1] of each next token ``tokens[:, 1:]``."""
  from tropd_jax import scoring

  def logp_BTV(graphdef, params):
    logits_BTV = nnx.merge(graphdef, params)(tokens_BT[:, :-1], mask_BT=valid_BT[:, :-1])
    return jax.nn.log_softmax(scoring.mask_vocab(logits_BTV, vocab_size), axis=-1)

  s_BTV, t_BTV = logp_BTV(s_graphdef, s_params), logp_BTV(t_graphdef, t_params)
  at = lambda x_BTV: jnp.take_along_axis(x_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
  p_BTV = jnp.exp(s_BTV)
  grad_sq_BT = 1.0 - 2.0 * jnp.exp(at(s_BTV)) + jnp.sum(p_BTV**2, axis=-1)
  return at(s_BTV), at(t_BTV), grad_sq_BT


def score(student, teacher, rollout, vocab_size: int, *, rows_per_call: int = 64):
  """``[(adv [T_r], grad_sq [T_r])]``: each rollout's completion tokens scored by both models."""
  from tropd_jax.train_step import cast

  fn = jax.jit(_token_scores, static_argnums=(0, 2, 6))
  s_graphdef, t_graphdef = nnx.graphdef(student), nnx.graphdef(teacher)
  s_params = cast(nnx.state(student, nnx.Param), "float32")
  t_params = cast(nnx.state(teacher, nnx.Param), "float32")
  out = []
  for start in range(0, len(rollout), rows_per_call):
    rows = range(start, min(start + rows_per_call, len(rollout)))
    length = -(-max(len(rollout.tokens[r]) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens_BT = np.zeros((rows_per_call, length), np.int32)
    valid_BT = np.zeros((rows_per_call, length), bool)
    for i, r in enumerate(rows):
      tokens_BT[i, :len(rollout.tokens[r])] = rollout.tokens[r]
      valid_BT[i, :len(rollout.tokens[r])] = True
    s_BT, t_BT, g_BT = jax.device_get(fn(s_graphdef, s_params, t_graphdef, t_params,
                                         tokens_BT, valid_BT, vocab_size))
    for i, r in enumerate(rows):
      # Target t + 1 is predicted at position t: completion tokens start after prompt + prefix.
      first = int(rollout.prompt_lengths[r] + rollout.prefix_lengths[r]) - 1
      last = len(rollout.tokens[r]) - 1
      out.append((t_BT[i, first:last] - s_BT[i, first:last], g_BT[i, first:last]))
  return out


def diagnose(config, *, log_tau: float = LOG_TAU) -> tuple[dict[str, float], list[RowScores]]:
  """The step-0 diagnosis of a run config: ``(summarize(rows), rows)``.

  The first step's prompts and on-policy rollouts are the ones the run would draw (its seed,
  prompt stream, sampler settings and rollout seed); guided rows are left out (their prefix is
  the teacher's, not the student's).
  """
  from tropd_jax import config as config_lib
  from tropd_jax import data as data_lib
  from tropd_jax import math_grading, models, sampling
  from tropd_jax import student as student_lib
  from tropd_jax import train
  from tropd_jax.train_step import cast

  settings = config_lib.settings(config)
  tokenizer, vocab_size = student_lib.run_tokenizer(config)
  prompts = data_lib.global_batch(data_lib.PromptStream.from_config(config, tokenizer))
  student = models.from_pretrained(config.student.path, dtype=config.student.dtype)
  teacher = models.from_pretrained(config.teacher.path, dtype=config.teacher.dtype)
  r = settings.rollout
  sampler = r.sampler(stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                      vocab_size=vocab_size)
  params = cast(nnx.state(student, nnx.Param), settings.student.compute_dtype)
  engine = sampling.Engine((nnx.graphdef(student), params), sampler)
  requests = sampling.requests([p.ids for p in prompts], n=r.num_samples,
                               max_new_tokens=r.max_new_tokens)
  rollout = engine.generate(requests, seed=train.rollout_seed(settings.seed, 0))
  scored = score(student, teacher, rollout, vocab_size)
  rows = []
  for i, (adv, grad_sq) in enumerate(scored):
    answer = prompts[i // r.num_samples].answer
    text = tokenizer.decode(rollout.completion(i))
    rows.append(RowScores(adv, grad_sq, math_grading.is_correct(text, answer)))
  return summarize(rows, log_tau), rows


ROWS = (  # (key, label) of the printed table, in order.
    ("rollouts", "rollouts"),
    ("accuracy", "correct rollouts"),
    ("mean_tokens", "mean completion tokens"),
    ("outlier_tokens_correct", "outlier tokens, in correct rollouts"),
    ("outlier_tokens_wrong", "outlier tokens, in wrong rollouts"),
    ("outliers_in_correct", "outlier tokens that lie in correct rollouts"),
    ("rollouts_with_outlier_correct", "correct rollouts with >= 1 outlier"),
    ("rollouts_with_outlier_wrong", "wrong rollouts with >= 1 outlier"),
    ("grad_share_adv2", "outliers' share of OPD's sum of A_t^2"),
    ("grad_share_adv2_gradnorm2", "outliers' share of OPD's sum of A_t^2 |grad_z log p|^2"),
)


def format_table(summaries: dict[str, dict[str, float]]) -> str:
  """A markdown table, one column per task (``{task: summarize(...)}``)."""
  names = list(summaries)
  lines = ["| step 0, student rollouts | " + " | ".join(names) + " |",
           "| --- |" + " ---: |" * len(names)]
  for key, label in ROWS:
    cells = []
    for name in names:
      v = summaries[name][key]
      cells.append(f"{v:.0f}" if key in ("rollouts", "mean_tokens") else
                   "–" if math.isnan(v) else f"{100 * v:.1f} %")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Outlier: `A_t = log πT(y_t) − log πθ(y_t) < log 0.1`. `∇_z`: the gradient with "
               "respect to the student's logits at the token.")
  return "\n".join(lines)


def main(argv=None) -> None:
  from tropd_jax import cli
  from tropd_jax import config as config_lib
  from tropd_jax.experiments import tasks

  parser = argparse.ArgumentParser(prog="python -m tropd_jax.experiments.diagnose",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", default="demo", help=f"one of {sorted(tasks.TASKS)}")
  parser.add_argument("--prompts", type=int, default=None,
                      help="prompts of the step (default: the config's rollout.prompts_per_step)")
  parser.add_argument("--seed", type=int, default=0, help="the run's seed")
  parser.add_argument("--out", default="", help="also write the numbers to this JSON file")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)

  def run():
    if args.prompts is not None and args.prompts < 1:
      raise cli.UserError(f"--prompts={args.prompts} must be >= 1.")
    config = config_lib.load_config_file(tasks.config_file(args.task))
    config.seed = args.seed
    if args.prompts is not None:
      config.rollout.prompts_per_step = args.prompts
    summary, _ = diagnose(config)
    print(format_table({args.task: summary}))
    if args.out:
      with open(args.out, "w") as f:
        json.dump({"task": args.task, "seed": args.seed,
                   "prompts": config.rollout.prompts_per_step, **summary}, f, indent=1)

  cli.run(run)


if __name__ == "__main__":
  main()
