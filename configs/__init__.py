"""Run configs (``python -m tropd_jax.main --config=configs/<name>.py[:variant]``)."""
