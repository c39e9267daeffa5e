"""avg@k / pass@k evaluation on AIME/AMC-style problem sets: k sampled responses per problem,
boxed answers graded.

`evaluate` takes the sampler as a function of prompt ids and a seed; `evaluate_model` runs every
set of a run's `eval.paths` with the run's own prompt formatting (`data.system_prompt`) and
evaluation sampler settings (`eval.temperature`, `eval.top_p`, `eval.top_k`, `eval.max_new_tokens`;
ids past the tokenizer's vocabulary never sampled) and reports each set and their mean. The
in-training evaluation (`train.evaluate_student`) and this command call it alike:

  python -m tropd_jax.evaluate --config=configs/aime.py --config.workdir=gs://bucket/run \
      [--step=200 | --checkpoint=DIR] [--config.eval.paths="('aime24.jsonl', 'aime25.jsonl')"] \
      [--config.eval.k=16] [--out=DIR]

The model is the run's student at an orbax step (`--step`, default the newest readable; only
its parameters are read) or an HF checkpoint (`--checkpoint`: directory, gs:// or hub id), in
the run's `student.compute_dtype`. The run is named as in `tropd_jax.student` (`--config` with
overrides, or `--workdir` for its run_config.json). Results go to `--out` (default
`<workdir>/eval/evaluate_<model>_<time>/`; never a directory that already holds results):
`<set>.samples.jsonl` (every graded sample) and `results.json`; the table is printed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
from collections.abc import Callable, Mapping, Sequence

import fsspec

from tropd_jax.config import eval_set_name
from tropd_jax import cli
from tropd_jax.math_grading import answers_match, extract_boxed

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
MEAN = "mean"
"""The row of the mean over the sets (the paper's headline number: mean of AIME24/25, AMC23)."""

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]
"""`(prompt_ids, seed) -> completion_ids`: one sampled completion per prompt, without the prompt."""


@dataclasses.dataclass(frozen=True)
class GradedSample:
  """One sampled response and its grade.

  Attributes:
    problem_index: position of the problem in the evaluated list.
    sample_index: which of the k samples of the problem (0 … k-1).
    seed: the seed the sample was generated with.
    response: the decoded completion (special tokens dropped).
    extracted: the content of its last `\\boxed{}`, or None.
    answer: the gold answer.
    correct: whether `extracted` equals `answer`.
    num_tokens: completion length in tokens (a stop token included).
  """

  problem_index: int
  sample_index: int
  seed: int
  response: str
  extracted: str | None
  answer: str
  correct: bool
  num_tokens: int


@cli.reads_user_input
def load_problems(
    path: str, problem_key: str = "problem", answer_key: str = "answer", limit: int | None = None
) -> list[dict]:
  """Reads `{"problem", "answer"}` records from a JSONL file (local or any fsspec URL, e.g. gs://).

  Args:
    path: the JSONL file, one JSON object per line (blank lines ignored).
    problem_key: the field holding the problem text.
    answer_key: the field holding the gold answer (numbers are turned into strings).
    limit: keep only the first `limit` problems; None or 0: all.

  Returns:
    `[{"problem": str, "answer": str}]` in file order.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a line is not a JSON object with both fields (the message names the line), or the
      file holds no problems.
  """
  if limit is not None and limit < 0:
    raise ValueError(f"limit={limit}: the number of problems must be >= 0 (0: all).")
  problems = []
  try:
    with fsspec.open(path, "rt", encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if limit and len(problems) >= limit:
          break
        if line.strip():
          problems.append(_problem(line, f"{path}:{number}", problem_key, answer_key))
  except FileNotFoundError:
    raise FileNotFoundError(f"problem file {path} does not exist") from None
  if not problems:
    raise ValueError(f"problem file {path} holds no problems")
  return problems


def _problem(line: str, where: str, problem_key: str, answer_key: str) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  for key, flag in ((problem_key, "problem_key"), (answer_key, "answer_key")):
    if key not in record:
      raise ValueError(
          f"{where}: no field {key!r} (fields: {', '.join(sorted(record))}); set {flag}.")
  return {"problem": str(record[problem_key]), "answer": str(record[answer_key])}


def grade(problem_index: int, sample_index: int, seed: int, response: str, answer: str,
          num_tokens: int) -> GradedSample:
  """Grades one response by its last boxed answer."""
  extracted = extract_boxed(response)
  correct = extracted is not None and answers_match(extracted, answer)
  return GradedSample(problem_index, sample_index, seed, response, extracted, answer, correct,
                      num_tokens)


def summarize(samples: Sequence[GradedSample], k: int) -> dict:
  """avg@k (mean accuracy over all samples), pass@k (problems with a correct sample), lengths."""
  problems = {s.problem_index for s in samples}
  solved = {s.problem_index for s in samples if s.correct}
  return {
      "avg@k": sum(s.correct for s in samples) / len(samples),
      "pass@k": len(solved) / len(problems),
      "num_problems": len(problems),
      "k": k,
      "mean_response_tokens": sum(s.num_tokens for s in samples) / len(samples),
  }


def evaluate(
    generate_fn: GenerateFn,
    tokenizer,
    problems: Sequence[Mapping[str, str]],
    *,
    k: int,
    out_jsonl: str | None = None,
    seed: int = 0,
    system_prompt: str | None = None,
    write: bool | None = None,
) -> dict:
  """Samples every problem k times, grades the boxed answers and reports avg@k and pass@k.

  Sample j of every problem comes from one `generate_fn` call over all prompts with seed `seed + j`.

  Args:
    generate_fn: `(prompt_ids, seed) -> completion_ids`, one completion per prompt.
    tokenizer: a `tropd_jax.models.Tokenizer` (chat-templated prompts, decoding).
    problems: `{"problem", "answer"}` records, as `load_problems` returns.
    k: samples per problem.
    out_jsonl: where to write every `GradedSample` (local or fsspec URL), ordered by problem.
    seed: the seed of the first sample.
    system_prompt: a system message before each problem, as training prompts have
      (`data.system_prompt`); None: none.
    write: whether this process writes `out_jsonl`; default: process 0 only.

  Returns:
    `{"avg@k", "pass@k", "num_problems", "k", "mean_response_tokens"}`.
  """
  if k < 1:
    raise ValueError(f"k={k}: the number of samples per problem must be at least 1")
  if not problems:
    raise ValueError("no problems to evaluate")
  prompt_ids = [tokenizer.encode_prompt(p["problem"], system=system_prompt) for p in problems]
  samples = []
  for j in range(k):
    completions = generate_fn(prompt_ids, seed + j)
    if len(completions) != len(prompt_ids):
      raise ValueError(f"generate_fn returned {len(completions)} completions for {len(prompt_ids)} "
                       "prompts")
    samples += [grade(i, j, seed + j, tokenizer.decode(ids), p["answer"], len(ids))
                for i, (p, ids) in enumerate(zip(problems, completions))]
  if out_jsonl is not None and _is_writer(write):
    write_samples(sorted(samples, key=lambda s: (s.problem_index, s.sample_index)), out_jsonl)
  return summarize(samples, k)


def write_samples(samples: Sequence[GradedSample], path: str) -> None:
  """Writes one JSON line per sample to `path` (local or fsspec URL), creating its directory."""
  fs, fpath = fsspec.core.url_to_fs(path)
  fs.makedirs(posixpath.dirname(fpath), exist_ok=True)
  with fs.open(fpath, "wt", encoding="utf-8") as f:
    for sample in samples:
      f.write(json.dumps(dataclasses.asdict(sample), ensure_ascii=False) + "\n")


def _is_writer(write: bool | None) -> bool:
  if write is not None:
    return write
  import jax

  return jax.process_index() == 0


def mean_result(results: Mapping[str, Mapping]) -> dict:
  """The unweighted mean over sets of avg@k, pass@k and response length (problems summed)."""
  rows = list(results.values())
  mean = lambda key: sum(r[key] for r in rows) / len(rows)
  return {"avg@k": mean("avg@k"), "pass@k": mean("pass@k"),
          "num_problems": sum(r["num_problems"] for r in rows), "k": rows[0]["k"],
          "mean_response_tokens": mean("mean_response_tokens")}


def with_mean(results: Mapping[str, Mapping]) -> dict:
  """``results`` plus a ``"mean"`` row when there are several sets."""
  return {**results, MEAN: mean_result(results)} if len(results) > 1 else dict(results)


def eval_scalars(results: Mapping[str, Mapping]) -> dict[str, float]:
  """Metrics of an evaluation: ``eval/<set>/avg@k`` etc. per set, ``eval/avg@k`` etc. the mean."""
  out = {}
  for prefix, r in [(f"eval/{name}/", r) for name, r in results.items()] + [
      ("eval/", mean_result(results))]:
    out.update({f"{prefix}avg@k": r["avg@k"], f"{prefix}pass@k": r["pass@k"],
                f"{prefix}response_tokens": r["mean_response_tokens"]})
  return out


def table_by_step(evals: Mapping[int, Mapping[str, Mapping]]) -> dict[str, Mapping]:
  """``{step: {set: result}}`` as rows ``step 0`` (one set) or ``step 0 <set>`` and ``step 0
  mean`` (several sets), for ``format_summary_table``."""
  rows = {}
  for step, results in evals.items():
    if len(results) == 1:
      rows[f"step {step}"] = next(iter(results.values()))
    else:
      rows.update({f"step {step} {name}": r for name, r in with_mean(results).items()})
  return rows


def format_summary_table(results: Mapping[str, Mapping]) -> str:
  """A markdown table of `{row name: evaluate(...) result}`, accuracies in percent."""
  lines = ["| dataset | problems | k | avg@k (%) | pass@k (%) | mean tokens |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['num_problems']} | {r['k']} | {100 * r['avg@k']:.1f} | "
                 f"{100 * r['pass@k']:.1f} | {r['mean_response_tokens']:.0f} |")
  return "\n".join(lines)


def sampler_generate_fn(model, tokenizer, mesh, max_new_tokens: int, temperature: float,
                        micro_batch_size: int = 0, *, top_p: float = 1.0, top_k: int = 0,
                        vocab_size: int | None = None, layout: str = "replicated",
                        engine_options: Mapping | None = None) -> GenerateFn:
  """A ``GenerateFn`` over ``tropd_jax.sampling.generate`` for ``model``.

  Args:
    model: the ``models.Transformer`` to sample, or its ``(graphdef, params)`` in the decode
      layout ``layout``.
    tokenizer: its ``models.Tokenizer`` (stop ids).
    mesh: the device mesh, or None.
    max_new_tokens, temperature, top_p, top_k: the sampler settings.
    micro_batch_size: slots, rows decoded at once (0: all).
    vocab_size: ids ``>= vocab_size`` are never sampled (embedding rows past the tokenizer's
      vocabulary); None: every row is a token.
    layout: the decode layout the weights are in (``sampling.layout``).
    engine_options: other ``SamplerConfig`` fields (page size, length buckets, page-table
      width, ...). A call whose longest prompt and budget exceed ``max_row_tokens`` sizes its
      page tables itself.
  """
  from tropd_jax import sampling

  def generate_fn(prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
    options = dict(engine_options or {})
    if options.get("max_row_tokens", 0) < max(map(len, prompt_ids)) + max_new_tokens:
      options["max_row_tokens"] = 0
    return sampling.generate(
        model, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop_ids=tokenizer.stop_ids, seed=seed, mesh=mesh, micro_batch_size=micro_batch_size,
        vocab_size=vocab_size, layout=layout, **options,
    ).completion_ids

  return generate_fn


def evaluate_model(model, tokenizer, config, *, mesh=None, vocab_size: int | None = None,
                   out_dir: str | None = None, write: bool | None = None,
                   layout: str = "replicated") -> dict[str, dict]:
  """Evaluates ``model`` on every set of ``config.eval.paths`` as the run evaluates its student.

  Prompts are formatted as training prompts are (chat template, ``data.system_prompt``);
  responses are sampled with the ``eval.*`` settings, ``rollout.slots`` rows at a time,
  sample j of every problem with seed ``config.seed + j``.

  Args:
    model: the ``models.Transformer`` to evaluate (in the dtype to sample in), or its
      ``(graphdef, params)`` in the decode layout ``layout``.
    tokenizer: the run's ``models.Tokenizer``.
    config: the run's config.
    mesh: the device mesh, or None.
    vocab_size: the tokenizer's vocabulary, when smaller than the model's embedding rows.
    out_dir: where ``<set>.samples.jsonl`` and ``results.json`` go; None: nowhere.
    write: whether this process writes them; default: process 0 only.
    layout: the decode layout of the weights (``sampling.layout``).

  Returns:
    ``{set name: evaluate(...) result}`` in ``eval.paths`` order (``mean_result`` for the mean).
  """
  e = config.eval
  _require_sets(config)
  r = config.rollout
  # The rollouts' engine shapes (buckets, pages, page-table width): evaluation and rollouts of
  # the same budget run the same compiled programs.
  engine_options = dict(
      pad_id=tokenizer.pad_id, page_size=r.page_size, num_pages=r.kv_pages,
      chunk_steps=r.chunk_steps, length_buckets=tuple(r.prompt_buckets),
      max_row_tokens=max(r.prompt_buckets) + e.max_new_tokens)
  generate_fn = sampler_generate_fn(
      model, tokenizer, mesh, e.max_new_tokens, e.temperature, r.slots,
      top_p=e.top_p, top_k=e.top_k, vocab_size=vocab_size, layout=layout,
      engine_options=engine_options)
  out_dir = out_dir.rstrip("/") if out_dir else None
  results = {}
  for path in e.paths:
    name = eval_set_name(path)
    problems = load_problems(path, e.problem_key, e.answer_key, e.limit)
    results[name] = evaluate(
        generate_fn, tokenizer, problems, k=e.k, seed=config.seed,
        system_prompt=config.data.system_prompt or None, write=write,
        out_jsonl=f"{out_dir}/{name}.samples.jsonl" if out_dir else None)
  if out_dir and _is_writer(write):
    with fsspec.open(f"{out_dir}/{RESULTS_FILE}", "wt") as f:
      json.dump(with_mean(results), f, indent=2)
  return results


def _require_sets(config) -> None:
  if not config.eval.paths:
    raise ValueError("config field eval.paths is empty: name the problem sets to evaluate on, "
                     "e.g. --config.eval.paths=\"('aime24.jsonl', 'aime25.jsonl')\".")


def _new_out_dir(out: str) -> str:
  fs, path = fsspec.core.url_to_fs(out)
  if fs.exists(f"{path}/{RESULTS_FILE}") or fs.glob(f"{path}/*.samples.jsonl"):
    raise FileExistsError(f"{out} already holds evaluation results; pass a new --out.")
  return out.rstrip("/")


def run(config, *, step: int | None = None, checkpoint: str | None = None,
        out: str | None = None) -> tuple[str, dict[str, dict], str]:
  """Evaluates the run's student at ``step`` (or the HF ``checkpoint``) on ``eval.paths``.

  Returns:
    ``(what was evaluated, {set: result}, the output directory)``.
  """
  from tropd_jax import models
  from tropd_jax import student as student_lib

  if step is not None and checkpoint:
    raise ValueError("give --step (an orbax step of the run) or --checkpoint (an HF "
                     "checkpoint), not both.")
  _require_sets(config)
  if out:
    out = _new_out_dir(out)
  mesh = student_lib.run_mesh(config)
  dtype = config.student.compute_dtype
  if checkpoint:
    model = models.from_pretrained(checkpoint, dtype=dtype, mesh=mesh)
    try:
      tokenizer = models.load_tokenizer(checkpoint)
    except FileNotFoundError:
      tokenizer = models.load_tokenizer(config.student.path)
    source = f"checkpoint {checkpoint}"
    label = eval_set_name(checkpoint)
  else:
    model, used = student_lib.restore_student(config, step=step, dtype=dtype, mesh=mesh)
    tokenizer = models.load_tokenizer(config.student.path)
    source = f"step {used} of {config.workdir}"
    label = f"step_{used}"
    log.info("evaluating the parameters of step %d of %s", used, config.workdir)
  vocab_size = tokenizer.vocab_size  # As training masks: ids past the tokenizer's never sampled.
  if out is None:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out = _new_out_dir(f"{config.workdir.rstrip('/')}/eval/evaluate_{label}_{stamp}")
  results = evaluate_model(model, tokenizer, config, mesh=mesh, vocab_size=vocab_size,
                           out_dir=out)
  return source, results, out


def main(argv) -> None:
  del argv
  import jax

  from tropd_jax import metrics
  from tropd_jax import student as student_lib

  metrics.configure_console_logging()
  try:
    config = student_lib.run_config(cli.config_flag_value(_CONFIG), _WORKDIR.value)
    source, results, out = run(config, step=_STEP.value, checkpoint=_CHECKPOINT.value,
                               out=_OUT.value)
  except (ValueError, FileNotFoundError, FileExistsError,
          student_lib.UnreadableCheckpointError) as e:
    raise cli.UserError(str(e)) from e  # cli.run prints it as one line, exit status 2.
  if jax.process_index() == 0:
    print(f"{source}, k={config.eval.k}, temperature={config.eval.temperature}, "
          f"top_p={config.eval.top_p}; samples and results.json in {out}")
    print(format_summary_table(with_mean(results)))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The run's config file (path.py[:variant]), overridable with "
      "--config.a.b=value (e.g. --config.eval.k=16); or give --workdir instead.",
      lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's work directory; its "
                                 "run_config.json is the config (instead of --config).")
  _STEP = flags.DEFINE_integer("step", None, "Orbax step of the run to evaluate (default: the "
                               "newest readable).")
  _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Evaluate this HF checkpoint "
                                    "(directory, gs:// or hub id) instead of an orbax step.")
  _OUT = flags.DEFINE_string("out", None, "Output directory (default: "
                             "<workdir>/eval/evaluate_<model>_<time>); must be new.")
  cli.run(lambda: app.run(main, flags_parser=cli.parse_absl_flags))
