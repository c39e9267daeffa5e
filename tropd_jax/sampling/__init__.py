"""The sampler's parts: its config, the ``Rollout`` it returns, and the jitted prefill/decode.

The public entry is ``tropd_jax.sampler`` (``Sampler``, ``generate``), which re-exports these types.
"""
