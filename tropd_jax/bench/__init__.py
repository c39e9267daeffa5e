"""Benchmarks (scripts, not tests): ``python -m tropd_jax.bench.<name>``."""
