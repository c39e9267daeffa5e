"""avg@k evaluation on AIME/AMC-style problem sets: k sampled responses per problem, boxed answers graded.

`evaluate` takes the sampler as a function of prompt ids and a seed, so the same code serves the
in-training evaluation (a closure over the student being trained) and `main`, the standalone command
for an HF checkpoint:

  python -m tropd_jax.evaluate --checkpoint=DIR --data=aime24.jsonl [aime25.jsonl …] --k=16 \
      --max_new_tokens=8096 --temperature=0.6 --out=eval/

Every graded sample goes to a JSONL file; `format_summary_table` makes the markdown summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence

import fsspec

from tropd_jax import cli
from tropd_jax.math_grading import answers_match, extract_boxed

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
    limit: keep only the first `limit` problems.

  Returns:
    `[{"problem": str, "answer": str}]` in file order.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a line is not a JSON object with both fields (the message names the line), or the
      file holds no problems.
  """
  problems = []
  try:
    with fsspec.open(path, "rt", encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if limit is not None and len(problems) >= limit:
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

  Returns:
    `{"avg@k", "pass@k", "num_problems", "k", "mean_response_tokens"}`.
  """
  if k < 1:
    raise ValueError(f"k={k}: the number of samples per problem must be at least 1")
  if not problems:
    raise ValueError("no problems to evaluate")
  prompt_ids = [tokenizer.encode_prompt(p["problem"]) for p in problems]
  samples = []
  for j in range(k):
    completions = generate_fn(prompt_ids, seed + j)
    if len(completions) != len(prompt_ids):
      raise ValueError(f"generate_fn returned {len(completions)} completions for {len(prompt_ids)} "
                       "prompts")
    samples += [grade(i, j, seed + j, tokenizer.decode(ids), p["answer"], len(ids))
                for i, (p, ids) in enumerate(zip(problems, completions))]
  if out_jsonl is not None:
    write_samples(sorted(samples, key=lambda s: (s.problem_index, s.sample_index)), out_jsonl)
  return summarize(samples, k)


def write_samples(samples: Sequence[GradedSample], path: str) -> None:
  """Writes one JSON line per sample to `path` (local or fsspec URL), creating its directory."""
  fs, fpath = fsspec.core.url_to_fs(path)
  fs.makedirs(posixpath.dirname(fpath), exist_ok=True)
  with fs.open(fpath, "wt", encoding="utf-8") as f:
    for sample in samples:
      f.write(json.dumps(dataclasses.asdict(sample), ensure_ascii=False) + "\n")


def format_summary_table(results: Mapping[str, Mapping]) -> str:
  """A markdown table of `{dataset name: evaluate(...) result}`, accuracies in percent."""
  lines = ["| dataset | problems | k | avg@k (%) | pass@k (%) | mean tokens |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['num_problems']} | {r['k']} | {100 * r['avg@k']:.1f} | "
                 f"{100 * r['pass@k']:.1f} | {r['mean_response_tokens']:.0f} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """Standalone evaluation of an HF checkpoint (`--checkpoint`) on JSONL problem sets (`--data`).

  Writes `<out>/<dataset>.samples.jsonl` per data file and `<out>/results.json`, and prints the
  summary table. The config-driven evaluation of a training run is wired by the trainer.
  """
  parser = argparse.ArgumentParser(prog="python -m tropd_jax.evaluate", description=main.__doc__)
  parser.add_argument("--config", help="a run's config file (path.py[:variant]): its student "
                      "checkpoint, eval.path, eval.k, eval.max_new_tokens and eval.temperature "
                      "are the defaults of the flags below")
  parser.add_argument("--checkpoint", help="HF checkpoint: directory, gs:// or hub id")
  parser.add_argument("--data", nargs="+", help="JSONL problem files")
  parser.add_argument("--k", type=int, help="samples per problem (default 16)")
  parser.add_argument("--max_new_tokens", type=int, help="default 8096")
  parser.add_argument("--temperature", type=float, help="default 0.6")
  parser.add_argument("--out", help="output directory (local or gs://); default <workdir>/eval")
  parser.add_argument("--problem_key", default="problem")
  parser.add_argument("--answer_key", default="answer")
  parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="bfloat16", help="parameter dtype")
  args = parser.parse_args(argv)
  if args.config:
    from tropd_jax.config import load_config_file

    cfg = load_config_file(args.config)
    args.checkpoint = args.checkpoint or cfg.student.path
    args.data = args.data or ([cfg.eval.path] if cfg.eval.path else None)
    args.k = args.k or cfg.eval.k
    args.max_new_tokens = args.max_new_tokens or cfg.eval.max_new_tokens
    args.temperature = cfg.eval.temperature if args.temperature is None else args.temperature
    args.out = args.out or f"{cfg.workdir}/eval"
    args.limit = args.limit or cfg.eval.limit or None
  args.k, args.max_new_tokens = args.k or 16, args.max_new_tokens or 8096
  args.temperature = 0.6 if args.temperature is None else args.temperature
  for name in ("checkpoint", "data", "out"):
    if not getattr(args, name):
      parser.error(f"--{name} is required (or give --config with it set)")

  # Imported here: the sampler and the model stack are only needed to run, not to grade.
  from tropd_jax import mesh as mesh_lib
  from tropd_jax import models, sampler

  mesh = mesh_lib.make_mesh()
  model = models.from_pretrained(args.checkpoint, dtype=args.dtype, mesh=mesh)
  tokenizer = models.load_tokenizer(args.checkpoint)
  generate_fn = sampler_generate_fn(model, tokenizer, mesh, args.max_new_tokens, args.temperature)
  out = args.out.rstrip("/")
  results = {}
  for path in args.data:
    name = os.path.splitext(posixpath.basename(path))[0]
    problems = load_problems(path, args.problem_key, args.answer_key, args.limit)
    results[name] = evaluate(generate_fn, tokenizer, problems, k=args.k,
                             out_jsonl=f"{out}/{name}.samples.jsonl", seed=args.seed)
  with fsspec.open(f"{out}/results.json", "wt") as f:
    json.dump(results, f, indent=2)
  print(format_summary_table(results))


def sampler_generate_fn(model, tokenizer, mesh, max_new_tokens: int, temperature: float,
                        micro_batch_size: int = 0) -> GenerateFn:
  """A ``GenerateFn`` over ``tropd_jax.sampler.generate`` for ``model``."""
  from tropd_jax import sampler

  def generate_fn(prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
    return sampler.generate(
        model, prompt_ids, max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
        stop_ids=tokenizer.stop_ids, seed=seed, mesh=mesh, micro_batch_size=micro_batch_size,
    ).completion_ids

  return generate_fn


if __name__ == "__main__":
  cli.run(main)
