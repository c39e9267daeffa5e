"""The paper's comparison (METHOD.md §6, §9) in small: every objective on an embedded task, 3 seeds.

  JAX_PLATFORMS=cpu python -m tropd_jax.experiments.ablation [--task=demo|tally] \
      [--out=runs/ablation] [--objectives=opd,tropd] [--seeds=0,1,2] [--steps=40]

Every run is ``configs/<task>.py:<objective>`` with ``seed`` changed and nothing else: the same
student, teacher, prompts per step, rollouts, learning rate and steps (the paper's budget rule).
The seed moves the prompt order, the rollouts and the trust-region draws; the shipped student is
the start of every run. Besides the objectives of METHOD.md §6, ``clip_outlier_bernoulli`` and
``mask_outlier_bernoulli`` are Clip and Mask Outlier with the Bernoulli trust region of TrOPD
(``objective.region=bernoulli``) instead of their threshold ``A_t > log 0.1``. Writes into
``--out``:

  <objective>/seed<k>/   each run's work directory (metrics.jsonl, metrics.png, TensorBoard)
  results.md             the table: mean ± std over seeds of the final held-out accuracy, and of
                         grad norm, student entropy and trust fraction over the last steps
  results.json           the same numbers, and every run's final values
  accuracy.png           held-out accuracy over steps, mean ± std over seeds, one line per objective
  curves.png             grad norm, student entropy and trust fraction over steps

A finished run is not run again, so an interrupted ablation resumes where it stopped. Compiled
programs are cached in ``<out>/jax_cache``: runs after the first skip most compilation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

OBJECTIVES = ("opd", "topk_fkl", "jsd", "entropy_opd", "eopd", "clip_outlier", "mask_outlier",
              "clip_outlier_bernoulli", "mask_outlier_bernoulli", "fkl_outlier", "tropd")
VARIANTS = {  # An ablation name that is not an objective: (config variant, field overrides).
    "clip_outlier_bernoulli": ("clip_outlier", {"objective.region": "bernoulli"}),
    "mask_outlier_bernoulli": ("mask_outlier", {"objective.region": "bernoulli"}),
}
LABELS = {
    "opd": "OPD", "topk_fkl": "top-k FKL", "jsd": "JSD", "entropy_opd": "entropy-OPD",
    "clip_outlier": "Clip Outlier", "mask_outlier": "Mask Outlier", "fkl_outlier": "FKL Outlier",
    "tropd": "TrOPD", "eopd": "EOPD", "clip_outlier_bernoulli": "Clip Outlier (Bernoulli)",
    "mask_outlier_bernoulli": "Mask Outlier (Bernoulli)",
}
PAPER = {  # METHOD.md §9: avg of AIME24/AIME25/AMC23, DeepSeek-R1-Distill-Qwen-1.5B student.
    "base": 41.27, "opd": 46.79, "topk_fkl": 1.40, "jsd": 47.90, "entropy_opd": 46.13,
    "clip_outlier": 47.86, "mask_outlier": 47.72, "fkl_outlier": 49.00, "tropd": 49.85,
}
ACCURACY = "eval/avg@k"
TRAINING_METRICS = ("grad_norm", "student_entropy", "trust_frac")
LAST_STEPS = 5  # Training metrics are averaged over this many final steps (one step is noisy).

log = logging.getLogger(__name__)


def run_config(objective: str, config_file: str):
  """The config of ``objective`` (an objective of ``OBJECTIVES`` or a key of ``VARIANTS``)."""
  from tropd_jax import config as config_lib

  variant, overrides = VARIANTS.get(objective, (objective, {}))
  config = config_lib.load_config_file(f"{config_file}:{variant}")
  config.update_from_flattened_dict(overrides)
  return config


def run_one(objective: str, seed: int, workdir: str, config_file: str, steps: int | None) -> bool:
  """Trains one (objective, seed) unless its work directory already holds the finished run;
  returns whether it trained."""
  from tropd_jax import train

  config = run_config(objective, config_file)
  config.seed = seed
  config.workdir = workdir
  if steps is not None:
    config.steps = steps
  if _finished(workdir, config.steps):
    log.info("%s seed %d: finished in %s, not rerun", objective, seed, workdir)
    return False
  start = time.perf_counter()
  train.run_training(config)
  log.info("%s seed %d: %.0f s", objective, seed, time.perf_counter() - start)
  return True


def _records(workdir: str) -> list[dict]:
  from tropd_jax import metrics as metrics_lib

  return metrics_lib.latest_per_step(metrics_lib.read_metrics(workdir))


def _finished(workdir: str, steps: int) -> bool:
  try:
    records = _records(workdir)
  except FileNotFoundError:
    return False
  return any(r["step"] == steps and ACCURACY in r for r in records)


def summarize_run(workdir: str) -> dict:
  """A run's accuracy before and after, its accuracy curve, and its late training metrics."""
  records = _records(workdir)
  evals = [(r["step"], r[ACCURACY]) for r in records if r.get(ACCURACY) is not None]
  train_records = [r for r in records if "grad_norm" in r]
  out = {"accuracy_before": evals[0][1], "accuracy": evals[-1][1], "accuracy_curve": evals,
         "steps": train_records[-1]["step"], "curves": {}}
  for key in TRAINING_METRICS:
    values = [r.get(key) for r in train_records]
    out["curves"][key] = [math.nan if v is None else v for v in values]
    out[key] = float(np.nanmean(out["curves"][key][-LAST_STEPS:]))
  out["grad_norm_max"] = float(np.nanmax(out["curves"]["grad_norm"]))
  out["wall_s"] = records[-1]["time"] - records[0]["time"]
  try:
    from tropd_jax import config as config_lib
    from tropd_jax import evaluate

    ev = config_lib.load_run_config(workdir).eval
    problems = sum(len(evaluate.load_problems(p, limit=ev.limit)) for p in ev.paths)
    out["eval"] = {"k": ev.k, "temperature": ev.temperature, "problems": problems}
  except (FileNotFoundError, config_lib.ConfigError):  # No run_config.json: eval unknown.
    out["eval"] = {}
  return out


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def table(results: dict[str, list[dict]]) -> str:
  """The markdown results table: ours (mean ± std over seeds) next to the paper's accuracy."""
  before = np.mean([r["accuracy_before"] for runs in results.values() for r in runs])
  seeds = {len(runs) for runs in results.values()}
  lines = [
      "| objective | held-out acc. (%) | Δ vs. student | grad norm | largest grad norm | "
      "student entropy | trust frac. | paper (%) |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
      f"| student before | {100 * before:.1f} | | | | | | {PAPER['base']:.2f} |",
  ]
  for objective, runs in results.items():
    acc, acc_sd = _mean_std([100 * r["accuracy"] for r in runs])
    cells = [f"{acc:.1f} ± {acc_sd:.1f}", f"{acc - 100 * before:+.1f}"]
    for key in TRAINING_METRICS:
      m, sd = _mean_std([r[key] for r in runs])
      cells.append(f"{m:.3g} ± {sd:.2g}")
      if key == "grad_norm":
        cells.append(f"{max(r['grad_norm_max'] for r in runs):.3g}")
    paper = f"{PAPER[objective]:.2f}" if objective in PAPER else "–"
    lines.append(f"| {LABELS.get(objective, objective)} | {' | '.join(cells)} | {paper} |")
  steps = {r["steps"] for runs in results.values() for r in runs}
  ev = next(iter(results.values()))[0].get("eval") or {}
  how = (f"avg@{ev['k']} sampled at temperature {ev['temperature']:g} on {ev['problems']} "
         "problems" if ev else "avg@k")
  lines.append("")
  lines.append(
      f"Held-out accuracy: {how}, after {'/'.join(map(str, sorted(steps)))} steps; "
      f"mean ± std over {'/'.join(map(str, sorted(seeds)))} seeds. Grad norm (before clipping), "
      f"student entropy (nats/token) and trust fraction: means over the last {LAST_STEPS} steps; "
      "largest grad norm: the largest of any step of any seed. The trust fraction is the share "
      "of sampled tokens inside each objective's region (Bernoulli `u < min(πT/πθ, 1)`; the "
      "threshold `A_t > log 0.1` for Clip/Mask Outlier, Bernoulli for their (Bernoulli) "
      "variants); objectives without a region log the Bernoulli one. Paper: avg of "
      "AIME24/AIME25/AMC23, DeepSeek-R1-Distill-Qwen-1.5B student (METHOD.md §9).")
  return "\n".join(lines)


def plot(results: dict[str, list[dict]], out_dir: str) -> list[str]:
  """Writes accuracy.png and curves.png; returns their paths."""
  from matplotlib.figure import Figure

  colors = dict(zip(results, [f"C{i}" for i in range(len(results))]))
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  for objective, runs in results.items():
    steps = [s for s, _ in runs[0]["accuracy_curve"]]
    acc = np.array([[100 * a for _, a in r["accuracy_curve"]] for r in runs])
    mean, sd = acc.mean(0), acc.std(0)
    ax.plot(steps, mean, marker="o", ms=3, lw=1.4, color=colors[objective],
            label=LABELS.get(objective, objective))
    ax.fill_between(steps, mean - sd, mean + sd, color=colors[objective], alpha=0.12)
  ax.set_xlabel("step")
  ax.set_ylabel("held-out accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  accuracy_png = os.path.join(out_dir, "accuracy.png")
  fig.savefig(accuracy_png, dpi=110)

  fig = Figure(figsize=(7, 7))
  axes = fig.subplots(len(TRAINING_METRICS), 1, sharex=True)
  for ax, key in zip(axes, TRAINING_METRICS):
    for objective, runs in results.items():
      curves = np.array([r["curves"][key] for r in runs])
      ax.plot(np.arange(1, curves.shape[1] + 1), np.nanmean(curves, 0), lw=1.2,
              color=colors[objective], label=LABELS.get(objective, objective))
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[0].legend(fontsize=7, ncol=4)
  axes[-1].set_xlabel("step")
  fig.tight_layout()
  curves_png = os.path.join(out_dir, "curves.png")
  fig.savefig(curves_png, dpi=110)
  return [accuracy_png, curves_png]


def main(argv=None) -> None:
  from tropd_jax import cli
  from tropd_jax.experiments import tasks

  parser = argparse.ArgumentParser(prog="python -m tropd_jax.experiments.ablation",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", default="demo", help=f"one of {sorted(tasks.TASKS)}: the config "
                      "file every run starts from (configs/<task>.py)")
  parser.add_argument("--out", default="", help="output directory (default: runs/ablation for "
                      "the demo, runs/ablation_<task> for another task)")
  parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
  parser.add_argument("--steps", type=int, default=None, help="default: the task config's")
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  cli.run(lambda: _run(args))


def parse_objectives(text: str) -> list[str]:
  """The comma-separated ``--objectives``, each checked against ``OBJECTIVES``."""
  from tropd_jax.cli import UserError

  objectives = [o for o in text.split(",") if o]
  for objective in objectives:
    if objective not in OBJECTIVES:
      raise UserError(f"--objectives: {objective!r} is not one of {', '.join(OBJECTIVES)}.")
  if not objectives:
    raise UserError("--objectives is empty: name at least one objective.")
  return objectives


def parse_seeds(text: str) -> list[int]:
  """The comma-separated ``--seeds``, distinct integers."""
  from tropd_jax.cli import UserError

  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    raise UserError(f"--seeds={text!r} must be comma-separated integers, e.g. 0,1,2.") from None
  if len(set(seeds)) != len(seeds):
    raise UserError(f"--seeds={text!r} names a seed twice.")
  return seeds


def _run(args) -> None:
  """The ablation of ``main``'s parsed arguments."""
  from tropd_jax.experiments import tasks

  config_file = tasks.config_file(args.task)
  out = args.out or ("runs/ablation" if args.task == "demo" else f"runs/ablation_{args.task}")
  objectives = parse_objectives(args.objectives)
  seeds = parse_seeds(args.seeds)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter, every run.
  import jax

  # Every run compiles the same programs: cache them on disk so only the first run pays.
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  start, load_before = time.perf_counter(), os.getloadavg()[0]
  results, trained = {}, 0
  for objective in objectives:
    for seed in seeds:
      workdir = os.path.join(out, objective, f"seed{seed}")
      trained += bool(run_one(objective, seed, workdir, config_file, args.steps))
      results.setdefault(objective, []).append(summarize_run(workdir))
  wall = time.perf_counter() - start
  text = table(results)
  runs = sum(map(len, results.values()))
  header = (
      f"# {args.task}: the ablation\n\n```bash\nJAX_PLATFORMS=cpu python -m "
      f"tropd_jax.experiments.ablation {' '.join(args.argv)}\n```\n\nWall time: "
      f"{wall / 60:.1f} min on {os.cpu_count()} CPU cores, one process: {trained} of the {runs} "
      f"runs trained by this command, the others read back from {out}; load average "
      f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n\n")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(header + text + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"task": args.task, "wall_s_this_invocation": wall, "results": results}, f,
              indent=1)
  pngs = plot(results, out)
  print(text)
  print(f"\nwrote {out}/results.md, results.json, {', '.join(map(os.path.basename, pngs))} "
        f"({wall / 60:.1f} min)")


if __name__ == "__main__":
  main()
