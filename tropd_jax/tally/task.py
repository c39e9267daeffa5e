"""The tally task: a running total over a list of labelled digits, one written line per item.

A problem is nine labelled digits, asked as ``Sum a=7 b=3 c=2 d=9 e=4 f=1 g=8 h=5 i=6.``. Its
worked solution opens with a sentence, starts the total at the first digit, writes one line per
further digit and boxes the final total::

    We add the values in order.
    a=7: start at 7.
    b=3: 7 plus 3 is 10.
    c=2: add 2 to 10, get 12.
    d=9: 9 more than 12 is 21.
    ...
    The answer is \\boxed{45}.

Each line opens with its item as the prompt writes it (``c=2``): the digit follows the same two
tokens in the prompt, so finding it is the copy a tiny model learns first (an induction head).
A line may be worded three ways (``WORDINGS``: ``plus``, ``add``, ``more``; they differ in phrase
and in the order of the two addends), and the opening and closing sentences two ways each: a
solution's ``Style`` picks one wording per line. All of them mean the same and are graded the
same. The teacher is trained on the ``plus`` wording almost always, the student mostly on the
other two, so most tokens on which the two models disagree choose a wording, not a number. The
student also has one habitual slip: adding a 9 it often forgets the carry (``17 plus 9 is
16``), and the total goes on from there to a wrong answer. Answers are graded as the math
evaluation grades them (``tropd_jax.math_grading``: the last ``\\boxed{}``).

Digits are 1-9, so totals stay below 82 and every step is one addition of a digit to a number
below 100. A solution is 223-287 characters, one token each under the task's tokenizer.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable

from tropd_jax import math_grading

NUM_VALUES = 9
LABELS = "abcdefghi"
WORDINGS = ("plus", "add", "more")
LINES = {  # How a line adds digit x to the total a, giving b.
    "plus": "{label}={x}: {a} plus {x} is {b}.",
    "add": "{label}={x}: add {x} to {a}, get {b}.",
    "more": "{label}={x}: {x} more than {a} is {b}.",
}
OPENINGS = ("We add the values in order.", "Keep a running total.")
CLOSINGS = ("The answer is \\boxed{{{total}}}.", "So the total is \\boxed{{{total}}}.")
_LINE_PATTERNS = (  # Reads (label, a, x, b) back from a line in any wording.
    re.compile(r"^(\w)=\d+: (?P<a>\d+) plus (?P<x>\d+) is (?P<b>\d+)\.$"),
    re.compile(r"^(\w)=\d+: add (?P<x>\d+) to (?P<a>\d+), get (?P<b>\d+)\.$"),
    re.compile(r"^(\w)=\d+: (?P<x>\d+) more than (?P<a>\d+) is (?P<b>\d+)\.$"),
)


@dataclasses.dataclass(frozen=True)
class Style:
  """How a solution is worded: its opening, one wording per line after the first, its closing.

  Attributes:
    opening: index into ``OPENINGS``.
    wordings: one of ``WORDINGS`` for each item after the first.
    closing: index into ``CLOSINGS``.
  """

  opening: int
  wordings: tuple[str, ...]
  closing: int

  @classmethod
  def plain(cls, wording: str = "plus") -> Style:
    """Every line in ``wording``, the first opening and closing."""
    return cls(0, (wording,) * (NUM_VALUES - 1), 0)


@dataclasses.dataclass(frozen=True)
class Mixture:
  """The distribution a model's training solutions are drawn from.

  Attributes:
    wordings: probability of each of ``WORDINGS``, drawn independently for every line.
    other_sentences: probability of the second opening, and (independently) of the second closing.
    slip_prob: how often a line that adds a 9 forgets the carry (each such line on its own).
  """

  wordings: tuple[float, float, float]
  other_sentences: float
  slip_prob: float

  def style(self, rng: random.Random) -> Style:
    return Style(
        opening=int(rng.random() < self.other_sentences),
        wordings=tuple(rng.choices(WORDINGS, self.wordings, k=NUM_VALUES - 1)),
        closing=int(rng.random() < self.other_sentences))


@dataclasses.dataclass(frozen=True)
class Problem:
  """Nine digits in 1-9, e.g. ``Problem((7, 3, 2, 9, 4, 1, 8, 5, 6))``."""

  values: tuple[int, ...]

  def __post_init__(self):
    if len(self.values) != NUM_VALUES or not all(1 <= v <= 9 for v in self.values):
      raise ValueError(f"values={self.values!r}: a problem is {NUM_VALUES} digits in 1-9.")

  @property
  def prompt(self) -> str:
    return "Sum " + " ".join(f"{label}={v}" for label, v in zip(LABELS, self.values)) + "."

  def totals(self) -> list[int]:
    """The running total after each item."""
    totals, value = [], 0
    for v in self.values:
      value += v
      totals.append(value)
    return totals

  @property
  def answer(self) -> int:
    return sum(self.values)

  def solution(self, style: Style | None = None, *, slips: Iterable[int] = ()) -> str:
    """The worked solution in ``style`` (default: all ``plus``).

    Args:
      style: the wording of each sentence.
      slips: items (1-based, after the first) whose line forgets the carry, keeping the tens
        digit the total had (``17 plus 9 is 16``); the total goes on from the wrong value. A
        line that crosses no ten cannot slip.
    """
    style = style or Style.plain()
    if len(style.wordings) != NUM_VALUES - 1 or not set(style.wordings) <= set(WORDINGS):
      raise ValueError(f"style.wordings={style.wordings!r}: give one of {WORDINGS} for each of "
                       f"the {NUM_VALUES - 1} lines after the first.")
    slips = set(slips)
    if not slips <= set(range(1, NUM_VALUES)):
      raise ValueError(f"slips={sorted(slips)}: lines are items 1-{NUM_VALUES - 1}.")
    value = self.values[0]
    lines = [OPENINGS[style.opening], f"{LABELS[0]}={value}: start at {value}."]
    for i, wording in enumerate(style.wordings, start=1):
      x = self.values[i]
      result = value // 10 * 10 + (value + x) % 10 if i in slips else value + x
      lines.append(LINES[wording].format(label=LABELS[i], a=value, x=x, b=result))
      value = result
    lines.append(CLOSINGS[style.closing].format(total=value))
    return "\n".join(lines)

  def record(self) -> dict:
    """The JSONL record that training and evaluation read."""
    return {"problem": self.prompt, "answer": str(self.answer)}


def draw_solution(problem: Problem, mixture: Mixture, rng: random.Random) -> str:
  """A training solution of ``problem`` drawn from ``mixture`` (its style, and its slips)."""
  style = mixture.style(rng)
  slips = [i for i in range(1, NUM_VALUES)
           if problem.values[i] == 9 and rng.random() < mixture.slip_prob]
  return problem.solution(style, slips=slips)


def read_steps(solution: str) -> list[tuple[str, int, int, int]]:
  """``(label, a, x, b)`` of every addition line of a solution, whatever its wording."""
  steps = []
  for line in solution.splitlines():
    for pattern in _LINE_PATTERNS:
      m = pattern.match(line)
      if m:
        steps.append((m.group(1), int(m["a"]), int(m["x"]), int(m["b"])))
  return steps


def random_problem(rng: random.Random) -> Problem:
  return Problem(tuple(rng.randint(1, 9) for _ in range(NUM_VALUES)))


def make_problems(count: int, seed: int, *, exclude: Iterable[str] = ()) -> list[Problem]:
  """``count`` distinct problems, none of whose prompts is in ``exclude``."""
  rng = random.Random(seed)
  seen = set(exclude)
  problems = []
  while len(problems) < count:
    p = random_problem(rng)
    if p.prompt not in seen:
      seen.add(p.prompt)
      problems.append(p)
  return problems


def is_correct(response: str, answer: str | int) -> bool:
  """The evaluation's verdict: the response's last ``\\boxed{}`` equals ``answer``."""
  return math_grading.is_correct(response, str(answer))
