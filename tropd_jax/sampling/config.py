"""SamplerConfig: everything that shapes a rollout call, frozen and hashable (a static jit argument)."""

from __future__ import annotations

import dataclasses

_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How rollouts are drawn.

  Attributes:
    max_new_tokens: the most tokens a row may generate after its prompt and forced prefix.
    temperature: softmax temperature; 0 means greedy (argmax).
    top_p: nucleus sampling: keep the most probable tokens whose mass reaches ``top_p`` (1: off).
    top_k: keep only the ``top_k`` most probable tokens (0: off). Applied before ``top_p``.
    stop_ids: a row ends after emitting any of these (EOS, the chat template's end token).
    length_buckets: the context (prompt + prefix) of each micro-batch is left-padded to the
      smallest bucket that holds its longest context, so prefill compiles once per bucket used.
      Longer contexts are padded to a multiple of the largest bucket.
    prefill_chunk: contexts are prefilled this many positions at a time (a ``lax.scan``), so
      prefill attention holds ``[C, heads, prefill_chunk, S]`` scores instead of ``[C, heads, P, S]``;
      contexts longer than it are padded to a multiple of it. 0: the whole context at once.
    micro_batch_size: rows decoded together (bounds KV-cache memory); a multiple of the
      samples per prompt ``n``. 0: all rows at once.
    pad_id: the token written at padding slots of ``Rollout.tokens``.
    vocab_size: ids ``>= vocab_size`` are never sampled (embedding rows beyond the tokenizer's
      vocabulary); None: every row of the vocabulary matrix is a token.
    cache_dtype: KV-cache dtype; None: the model's parameter dtype.
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop_ids: tuple[int, ...] = ()
  length_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  prefill_chunk: int = 512
  micro_batch_size: int = 0
  pad_id: int = 0
  vocab_size: int | None = None
  cache_dtype: str | None = None

  def __post_init__(self):
    # Lists from config files become tuples so the config stays hashable.
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
    _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
    _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0: greedy)")
    _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
    _check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0: off)")
    _check(self.prefill_chunk >= 0, "prefill_chunk", self.prefill_chunk, "must be >= 0 (0: off)")
    _check(self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size,
           "must be >= 0 (0: all rows at once)")
    buckets = self.length_buckets
    _check(bool(buckets) and buckets[0] >= 1 and all(a < b for a, b in zip(buckets, buckets[1:])),
           "length_buckets", buckets, "must be positive and strictly increasing")
    _check(all(i >= 0 for i in self.stop_ids), "stop_ids", self.stop_ids, "must be token ids >= 0")
    _check(self.vocab_size is None or self.vocab_size >= 1, "vocab_size", self.vocab_size,
           "must be >= 1 or None")
    _check(self.cache_dtype is None or self.cache_dtype in _DTYPES, "cache_dtype",
           self.cache_dtype, f"must be one of {_DTYPES} or None")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def replace(self, **kwargs) -> SamplerConfig:
    return dataclasses.replace(self, **kwargs)

  def bucket(self, length: int) -> int:
    """The padded context length for a longest context of ``length`` tokens."""
    top = self.length_buckets[-1]
    padded = next((b for b in self.length_buckets if length <= b), -(-length // top) * top)
    chunk = self.prefill_chunk
    return -(-padded // chunk) * chunk if 0 < chunk < padded else padded

  def rows_per_micro_batch(self, num_rows: int, n: int) -> int:
    """Rows decoded together for ``num_rows`` rows of ``n`` samples per context."""
    if self.micro_batch_size == 0:
      return num_rows
    if self.micro_batch_size % n:
      raise ValueError(
          f"sampler.micro_batch_size={self.micro_batch_size} must be a multiple of the samples "
          f"per prompt n={n}, so that each prompt's samples share one prefill."
      )
    return min(self.micro_batch_size, num_rows)


def _check(ok: bool, field: str, value, why: str) -> None:
  if not ok:
    raise ValueError(f"sampler.{field}={value!r}: {why}.")
