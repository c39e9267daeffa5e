"""Entry point: ``python -m tropd_jax.main --config=configs/aime.py [--config.a.b=value]``.

A mistake in the config or the inputs prints one line (``error: ...``, exit status 2); SIGINT
or SIGTERM saves the last completed step and exits 130 or 143 (see ``tropd_jax.cli``).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0 for multi-process runs on CPU/GPU "
    "(TPU pods find it themselves).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TPU_POD = flags.DEFINE_bool(
    "tpu_pod", False, "Run on every worker of a multi-host Cloud TPU slice: jax.distributed "
    "finds the workers from the TPU VM metadata (tpu/launch.sh sets it on pod slices).")


def main(argv) -> None:
  del argv
  import jax

  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _TPU_POD.value or (jax.config.jax_platforms in (None, "", "tpu") and _on_gke_tpu_pod()):
    jax.distributed.initialize()
  from tropd_jax import cli, metrics, train

  metrics.configure_console_logging()

  train.run_training(cli.config_flag_value(_CONFIG))


def _on_gke_tpu_pod() -> bool:
  """Several TPU workers named in the environment (GKE sets it; TPU VMs keep it in metadata)."""
  import os

  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


if __name__ == "__main__":
  from tropd_jax import cli

  flags.mark_flags_as_required(["config"])
  cli.run(lambda: app.run(main, flags_parser=cli.parse_absl_flags))
