"""The paper's single-domain math run (METHOD.md §8): Skywork-OR1-Math-7B → DeepSeek-R1-Distill-Qwen-1.5B.

Prompts: the math subset of OpenThoughts3, made once with the run's tokenizer and budget
(README, "Data"); it writes ``data.train_path``:

  python -m tropd_jax.prepare_prompts --config=configs/aime.py \
      --config.data.train_path=gs://my-bucket/tropd/data/openthoughts3_math.parquet \
      --source='hf://datasets/open-thoughts/OpenThoughts3-1.2M/data/train-*.parquet' \
      --source_prompt_key=conversations --where=domain=math

Launch (on a TPU VM; paths may be local, gs:// or hub ids):

  python -m tropd_jax.main --config=configs/aime.py \
      --config.workdir=gs://my-bucket/tropd/aime \
      --config.data.train_path=gs://my-bucket/tropd/data/openthoughts3_math.parquet

Baselines of METHOD.md §6 are variants: ``--config=configs/aime.py:opd`` (also topk_fkl, jsd,
entropy_opd, eopd, clip_outlier, mask_outlier, fkl_outlier, tropd). Any field can be overridden
with ``--config.a.b=value``; every field is documented in tropd_jax/config.py. What a step costs
on a slice, before renting it: ``python -m tropd_jax.aot --config=configs/aime.py
--topology=v5p:2x2x1``.
"""

from configs import common


def get_config(variant: str | None = None):
  c = common.paper(common.base(variant))
  c.workdir = "runs/aime_tropd"  # Use a gs:// URL on TPU VMs.

  c.student.path = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
  c.teacher.path = "Skywork/Skywork-OR1-Math-7B"

  c.mesh.data = 1
  c.mesh.fsdp = -1  # All chips: parameters, optimizer state and rows sharded.
  c.mesh.tensor = 1

  # What `python -m tropd_jax.prepare_prompts --config=configs/aime.py ...` writes (see the
  # docstring); on a TPU VM, a gs:// URL every worker reads, e.g.
  # gs://my-bucket/tropd/data/openthoughts3_math.parquet.
  c.data.train_path = "data/openthoughts3_math.parquet"
  c.data.prompt_key = "problem"  # prepare_prompts writes the user's text here.
  c.data.answer_key = "answer"
  c.data.system_prompt = ""  # DeepSeek-R1-Distill takes the problem as the user turn alone.

  # The sampler: 256 rows decode at once (64 per chip of a v5p-8); a finished row's slot takes
  # the next waiting row. Pages for every slot's whole row (8096 + 1024 tokens): 17 GiB per chip.
  c.rollout.slots = 256
  c.rollout.page_size = 64

  c.train.micro_batch = 8  # Packed rows of 9216 positions: 2 per chip of a v5p-8.
  c.train.score_chunk = 512

  c.checkpoint.every = 20
  c.checkpoint.keep = 3

  # The paper's sets, each a JSONL of {problem, answer}; reported per set and as their mean, e.g.
  # --config.eval.paths="('gs://my-bucket/data/aime24.jsonl', 'gs://my-bucket/data/aime25.jsonl',
  # 'gs://my-bucket/data/amc23.jsonl')".
  c.eval.paths = ()
  return c
