"""Grading math responses: the last `\\boxed{}` answer, checked against the gold answer.

Answers are compared with Hugging Face's `math_verify` (LaTeX → SymPy, numeric and symbolic
equality), falling back to equality of normalized strings for answers it cannot parse.

`math_verify` bounds parsing and comparison with `signal.alarm`, which only works in the main thread.
Off the main thread (an evaluation run in a background thread) it runs without a time limit.
"""

from __future__ import annotations

import logging
import re
import threading

import math_verify
from math_verify.errors import TimeoutException

log = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_TIMEOUT_S = 5
# An escaped character (so `\{` and `\}` do not count as braces) or a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# Spacing and sizing commands, dollar signs and whitespace: nothing a string comparison should see.
_NOISE = re.compile(r"\\left|\\right|\\displaystyle|\\[,;:! ]|\$|\s")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")


def extract_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces kept.

  `\\boxed 5` (no braces) gives "5". A last box cut off before its closing brace, or an empty one,
  gives None.
  """
  start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
  if start < 0:
    return None
  rest = text[start + len(command):]
  if not rest.startswith("{"):
    bare = re.match(r"\s+([^\s$]+)", rest)
    return bare.group(1) if bare else None
  depth = 0
  for token in _BRACE_TOKEN.finditer(rest):
    depth += {"{": 1, "}": -1}.get(token.group(), 0)
    if depth == 0:
      return rest[1:token.start()].strip() or None
  return None


def normalize(answer: str) -> str:
  """A canonical string form of a LaTeX answer for the fallback comparison."""
  answer = _TEXT.sub(r"\1", _NOISE.sub("", answer))
  answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  return answer.rstrip(".").lower()


def _verify(predicted: str, gold: str) -> bool:
  """`math_verify`'s verdict; False when it cannot parse either side, fails or times out."""
  timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
  try:
    gold_parsed = math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = math_verify.parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    return bool(gold_parsed and pred_parsed) and math_verify.verify(
        gold_parsed, pred_parsed, timeout_seconds=timeout)
  except (Exception, TimeoutException):  # A grader failure marks the sample wrong, never the run.
    log.debug("math_verify failed on %r vs %r", predicted, gold, exc_info=True)
    return False


def answers_match(predicted: str, gold: str) -> bool:
  """Whether an extracted answer equals the gold answer (which may itself be boxed or in `$…$`)."""
  gold = extract_boxed(gold) or gold.strip().strip("$")
  predicted = predicted.strip().strip("$")
  return _verify(predicted, gold) or normalize(predicted) == normalize(gold)


def is_correct(response_text: str, answer: str) -> bool:
  """Whether the last boxed answer of a response equals `answer`; False when nothing is boxed."""
  predicted = extract_boxed(response_text)
  return predicted is not None and answers_match(predicted, answer)
