"""The demo task: chained addition and subtraction, solved with a written chain of thought.

A problem is a start value and 2-4 steps, asked as ``What is 23+7-5+9?``. Its worked solution
writes one line per step and boxes the result::

    23+7=30
    30-5=25
    25+9=34
    The answer is \\boxed{34}.

That is the teacher's style (``"lines"``). The ``"inline"`` style says the same on one line,
``23+7=30, 30-5=25, 25+9=34, so \\boxed{34}.``: the teacher is trained mostly on ``lines``, the
student half and half; the student also learns from sloppy solutions that forget a carry or a
borrow (``Problem.solution(slip_prob=...)``). The two models disagree on the shape of a solution
as well as on its arithmetic. Answers are graded exactly as the math evaluation grades them
(``tropd_jax.math_grading``: the last ``\\boxed{}`` checked with ``math_verify``).

Running totals stay in [0, 99] and step operands in [1, 9], so a solution is ~20-40 tokens.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

from tropd_jax import math_grading

STYLES = ("lines", "inline")
MIN_START, MAX_START = 10, 99
MAX_OPERAND = 9


@dataclasses.dataclass(frozen=True)
class Problem:
  """A start value and its steps, e.g. ``Problem(23, (("+", 7), ("-", 5), ("+", 9)))``."""

  start: int
  steps: tuple[tuple[str, int], ...]

  @property
  def expression(self) -> str:
    return f"{self.start}" + "".join(f"{op}{x}" for op, x in self.steps)

  @property
  def prompt(self) -> str:
    return f"What is {self.expression}?"

  def totals(self) -> list[int]:
    """The running total after each step."""
    totals, value = [], self.start
    for op, x in self.steps:
      value = value + x if op == "+" else value - x
      totals.append(value)
    return totals

  @property
  def answer(self) -> int:
    return self.totals()[-1]

  def solution(self, style: str = "lines", *, slip_prob: float = 0.0,
               rng: random.Random | None = None) -> str:
    """The worked solution in ``style`` (one of ``STYLES``).

    With ``slip_prob`` > 0 it is a sloppy one: each step that crosses a multiple of ten forgets
    the carry (or the borrow) with that probability, keeping the tens digit it started from
    (``27+5=22``), and the chain goes on from the wrong value to a wrong answer.
    """
    if style not in STYLES:
      raise ValueError(f"style={style!r} is not one of {STYLES}.")
    value, lines = self.start, []
    for op, x in self.steps:
      result = value + x if op == "+" else value - x
      if slip_prob and result // 10 != value // 10 and rng.random() < slip_prob:
        result = value // 10 * 10 + result % 10
      lines.append(f"{value}{op}{x}={result}")
      value = result
    if style == "lines":
      return "\n".join(lines) + f"\nThe answer is \\boxed{{{value}}}."
    return ", ".join(lines) + f", so \\boxed{{{value}}}."

  def record(self) -> dict:
    """The JSONL record that training and evaluation read."""
    return {"problem": self.prompt, "answer": str(self.answer)}


def random_problem(rng: random.Random, num_steps: tuple[int, int] = (2, 4)) -> Problem:
  """A uniformly drawn start, step count and steps whose running total stays in [0, 99]."""
  value = rng.randint(MIN_START, MAX_START)
  start, steps = value, []
  for _ in range(rng.randint(*num_steps)):
    x = rng.randint(1, MAX_OPERAND)
    op = rng.choice("+-")
    if not 0 <= (value + x if op == "+" else value - x) <= 99:
      op = "-" if op == "+" else "+"
    value = value + x if op == "+" else value - x
    steps.append((op, x))
  return Problem(start, tuple(steps))


def make_problems(count: int, seed: int, *, exclude: Iterable[str] = (),
                  num_steps: tuple[int, int] = (2, 4)) -> list[Problem]:
  """``count`` distinct problems, none of whose prompts is in ``exclude``."""
  rng = random.Random(seed)
  seen = set(exclude)
  problems = []
  while len(problems) < count:
    p = random_problem(rng, num_steps)
    if p.prompt not in seen:
      seen.add(p.prompt)
      problems.append(p)
  return problems


def is_correct(response: str, answer: str | int) -> bool:
  """The evaluation's verdict: the response's last ``\\boxed{}`` equals ``answer``."""
  return math_grading.is_correct(response, str(answer))
