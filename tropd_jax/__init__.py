"""tropd_jax: Trust Region On-Policy Distillation in JAX/Flax NNX.

Shape key. Every module names its arrays with these letters as a suffix (``logits_BTV``,
``k_pages_GPZH``) and uses them in docstrings and einsum strings:

  B  rows (a batch of sequences, or decode slots)
  T  positions of a row (query length)
  S  key positions / cache slots a query may read
  D  model width                    F  MLP width
  V  vocabulary rows                K  teacher top-k
  N  query heads                    G  key/value heads
  Q  query heads per key/value head (N = G·Q)
  H  head dim                       L  layers
  C  positions per chunk            M  micro-batches
  P  pages of the KV cache          Z  tokens per page
  E  entries of a decode call's list of live pages
"""

__version__ = "0.1.0"
