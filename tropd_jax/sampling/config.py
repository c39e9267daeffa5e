"""SamplerConfig: how rows are drawn and how the engine holds them; frozen and hashable.

It is a static argument of the engine's jitted programs, so two engines with equal configs
share their compiled programs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION = ("auto", "xla", "pallas")
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How rows are drawn, and the engine's capacity.

  Attributes:
    max_new_tokens: the most tokens a row may draw (a request may ask for fewer).
    temperature: softmax temperature; 0 means greedy (argmax).
    top_p: nucleus sampling: keep the most probable tokens whose mass reaches ``top_p`` (1: off).
    top_k: keep only the ``top_k`` most probable tokens (0: off). Applied before ``top_p``.
    stop_ids: a row ends after drawing any of these (EOS, the chat template's end token).
    vocab_size: ids ``>= vocab_size`` are never drawn (embedding rows beyond the tokenizer's
      vocabulary); None: every row of the vocabulary matrix is a token.
    pad_id: the token id at padding positions of prefill.
    slots: rows decoded at once (global; rounded up to a multiple of the devices holding
      different rows). When a row ends, its slot takes the next waiting row. 0: one per row.
    page_size: Z, tokens per page of the KV cache.
    num_pages: pages in the KV-cache pool (global, a scratch page per shard included); 0: enough
      for every slot to hold a whole row (and, where rows are admitted inside the decode loop,
      a slot count of staged contexts). With fewer, a row that cannot grow is put back in the
      queue and drawn again later (the same tokens: its draws depend on its key only), and
      the host refills slots between calls.
    chunk_steps: the most decode steps per call; the host refills free slots between calls.
      Where rows are admitted inside the loop (the XLA path, one batch shard, the default
      pool), a call plans at most half a page of steps (every busy row's next positions are
      read by attention from the call's first step, written or not).
    refill_fraction: a decode call returns early once this fraction of the slots has ended
      (and rows are waiting, none of them staged), so free slots do not idle for a whole
      chunk.
    prefill_tokens: a prefill call admits rows while (rows x padded context) stays within this
      many tokens per shard (bounds prefill memory; one row is always admitted).
    length_buckets: contexts of a prefill call are padded to the smallest bucket that holds the
      longest (bounded compilations); longer ones to a multiple of the largest bucket.
    max_row_tokens: the longest row (context and drawn tokens) the page tables hold; 0: from
      each call's longest context and budget, rounded up to a power of two pages.
    cache_dtype: KV-cache dtype; None: the model's parameter dtype.
    attention: decode attention over the pages: ``xla``, ``pallas`` (TPU kernel) or ``auto``.
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop_ids: tuple[int, ...] = ()
  vocab_size: int | None = None
  pad_id: int = 0
  slots: int = 0
  page_size: int = 64
  num_pages: int = 0
  chunk_steps: int = 64
  refill_fraction: float = 0.125
  prefill_tokens: int = 16384
  length_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  max_row_tokens: int = 0
  cache_dtype: str | None = None
  attention: str = "auto"

  def __post_init__(self):
    # Lists from config files become tuples so the config stays hashable.
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
    _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
    _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0: greedy)")
    _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
    _check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0: off)")
    _check(self.slots >= 0, "slots", self.slots, "must be >= 0 (0: one per row)")
    _check(self.page_size >= 1, "page_size", self.page_size, "must be >= 1")
    _check(self.num_pages >= 0, "num_pages", self.num_pages, "must be >= 0 (0: auto)")
    _check(self.chunk_steps >= 1, "chunk_steps", self.chunk_steps, "must be >= 1")
    _check(0 < self.refill_fraction <= 1, "refill_fraction", self.refill_fraction,
           "must be in (0, 1]")
    _check(self.prefill_tokens >= 1, "prefill_tokens", self.prefill_tokens, "must be >= 1")
    _check(self.max_row_tokens >= 0, "max_row_tokens", self.max_row_tokens, "must be >= 0")
    buckets = self.length_buckets
    _check(bool(buckets) and buckets[0] >= 1 and all(a < b for a, b in zip(buckets, buckets[1:])),
           "length_buckets", buckets, "must be positive and strictly increasing")
    _check(all(i >= 0 for i in self.stop_ids), "stop_ids", self.stop_ids, "must be token ids >= 0")
    _check(self.vocab_size is None or self.vocab_size >= 1, "vocab_size", self.vocab_size,
           "must be >= 1 or None")
    _check(self.cache_dtype is None or self.cache_dtype in _DTYPES, "cache_dtype",
           self.cache_dtype, f"must be one of {_DTYPES} or None")
    _check(self.attention in _ATTENTION, "attention", self.attention,
           f"must be one of {_ATTENTION}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def program(self) -> SamplerConfig:
    """The config the engine's programs are compiled for: ``temperature`` and ``top_p`` reach
    them as arguments (``draw_params``), so only whether each applies is kept here, and
    configs that differ in their values alone share programs (evaluation and rollouts)."""
    return self.replace(temperature=0.0 if self.greedy else 1.0,
                        top_p=1.0 if self.top_p == 1 else 0.5)

  def draw_params(self):
    """float32 ``[temperature, top_p]``, the programs' ``draw_params`` argument."""
    return np.asarray([self.temperature or 1.0, self.top_p], np.float32)

  def replace(self, **kwargs) -> SamplerConfig:
    return dataclasses.replace(self, **kwargs)

  def bucket(self, length: int) -> int:
    """The padded context length of a prefill whose longest context has ``length`` tokens."""
    top = self.length_buckets[-1]
    return next((b for b in self.length_buckets if length <= b), -(-length // top) * top)


def _check(ok: bool, field: str, value, why: str) -> None:
  if not ok:
    raise ValueError(f"sampler.{field}={value!r}: {why}.")
