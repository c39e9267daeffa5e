"""Hugging Face checkpoints in and out: ``from_pretrained`` / ``save_pretrained``.

A checkpoint is a directory (local, gs://, or a hub id resolved through
``huggingface_hub``) with ``config.json`` and one or more ``*.safetensors``
files (with ``model.safetensors.index.json`` when sharded). Loading goes
tensor by tensor: each HF tensor is read (memory-mapped where local),
converted to the model's layout and dtype, and placed straight onto the mesh
with ``jax.make_array_from_callback``, so every device reads only its shard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable

import fsspec
import jax
import numpy as np
from flax import nnx

from tropd_jax import cli
from tropd_jax import mesh as mesh_lib
from tropd_jax.models.config import ModelConfig
from tropd_jax.models.safetensors_io import SafetensorsFile, is_local, write_safetensors
from tropd_jax.models.transformer import Transformer, abstract_model, with_dtype

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def resolve_checkpoint(path: str, *, marker: str | None = "config.json") -> str:
  """A readable directory for ``path``: local dir, gs:// URL or HF hub id.

  ``marker`` is a file the directory must hold (None: any directory).
  """
  path = str(path)
  if not is_local(path):
    path = path.rstrip("/")
    if marker and not fsspec.open(f"{path}/{marker}").fs.exists(f"{path}/{marker}"):
      raise FileNotFoundError(f"no {marker} under {path}: point at a checkpoint directory.")
    return path
  if os.path.isdir(path):
    if marker and not os.path.exists(os.path.join(path, marker)):
      raise FileNotFoundError(
          f"{path} has no {marker}: point at a Hugging Face checkpoint directory."
      )
    return path
  if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path):
    try:
      from huggingface_hub import snapshot_download

      return snapshot_download(
          path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
      )
    except Exception as e:
      raise FileNotFoundError(
          f"checkpoint {path!r} is not a local directory and could not be fetched from the "
          f"Hugging Face hub ({type(e).__name__}); download it and pass its directory."
      ) from e
  raise FileNotFoundError(
      f"no checkpoint at {path!r}: expected a directory with config.json and *.safetensors, "
      "a gs:// URL, or a hub id like 'Qwen/Qwen3-1.7B'."
  )


@cli.reads_user_input
def load_config(path: str, *, dtype: str | None = None) -> ModelConfig:
  """The ``ModelConfig`` of the checkpoint at ``path`` (reads only its config.json)."""
  ckpt = resolve_checkpoint(path)
  return with_dtype(ModelConfig.from_hf_config(read_json(f"{ckpt}/config.json")), dtype)


def read_json(path: str) -> dict:
  with fsspec.open(path, "r") as f:
    return json.load(f)


# --- Name and layout mapping between HF tensors and the NNX model -------------

def _hf_tensor(path: tuple, cfg: ModelConfig) -> tuple[str, Callable, Callable]:
  """HF name, HF->model and model->HF layout conversions for one parameter path."""
  ident = lambda w: w
  t = lambda w: w.T
  if path == ("embed_VD",):
    return "model.embed_tokens.weight", ident, ident
  if path == ("lm_head_VD",):
    return "lm_head.weight", ident, ident
  if path == ("final_norm", "scale"):
    return "model.norm.weight", ident, ident
  _, i, *rest = path
  p = f"model.layers.{i}."
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  table = {
      ("attn_norm", "scale"): ("input_layernorm.weight", ident, ident),
      ("mlp_norm", "scale"): ("post_attention_layernorm.weight", ident, ident),
      ("attn", "q_DNH"): ("self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h),
                          lambda w: w.reshape(d, n * h).T),
      ("attn", "k_DGH"): ("self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h),
                          lambda w: w.reshape(d, k * h).T),
      ("attn", "v_DGH"): ("self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h),
                          lambda w: w.reshape(d, k * h).T),
      ("attn", "o_NHD"): ("self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d),
                          lambda w: w.reshape(n * h, d).T),
      ("attn", "q_bias_NH"): ("self_attn.q_proj.bias", lambda w: w.reshape(n, h),
                              lambda w: w.reshape(n * h)),
      ("attn", "k_bias_GH"): ("self_attn.k_proj.bias", lambda w: w.reshape(k, h),
                              lambda w: w.reshape(k * h)),
      ("attn", "v_bias_GH"): ("self_attn.v_proj.bias", lambda w: w.reshape(k, h),
                              lambda w: w.reshape(k * h)),
      ("attn", "o_bias_D"): ("self_attn.o_proj.bias", ident, ident),
      ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", ident, ident),
      ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", ident, ident),
      ("mlp", "gate_DF"): ("mlp.gate_proj.weight", t, t),
      ("mlp", "up_DF"): ("mlp.up_proj.weight", t, t),
      ("mlp", "down_FD"): ("mlp.down_proj.weight", t, t),
  }
  name, to_model, to_hf = table[tuple(rest)]
  return p + name, to_model, to_hf


def _params(model: Transformer):
  """``(path, Param)`` for every parameter, in a stable order."""
  return [
      (tuple(p), v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)
  ]


class _TensorIndex:
  """Which safetensors file holds each tensor, opened lazily."""

  def __init__(self, ckpt: str):
    index_path = f"{ckpt}/model.safetensors.index.json"
    fs = fsspec.open(index_path).fs
    if fs.exists(index_path):
      weight_map = read_json(index_path)["weight_map"]
    else:
      files = sorted(os.path.basename(f) for f in fs.glob(f"{ckpt}/*.safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {ckpt}.")
      weight_map = {}
      for name in files:
        for key in SafetensorsFile(f"{ckpt}/{name}").keys():
          weight_map[key] = name
    self.ckpt, self.weight_map, self._open = ckpt, weight_map, {}

  def file(self, name: str) -> SafetensorsFile:
    if name not in self.weight_map:
      raise KeyError(name)
    fname = self.weight_map[name]
    if fname not in self._open:
      self._open[fname] = SafetensorsFile(f"{self.ckpt}/{fname}")
    return self._open[fname]


@cli.reads_user_input
def from_pretrained(
    path: str,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
    attention_impl: str = "einsum",
) -> Transformer:
  """Loads an HF checkpoint into a (sharded) ``Transformer``.

  Args:
    path: local directory, gs:// URL, or hub id.
    dtype: parameter dtype (``'bfloat16'``, ``'float32'``); default: config.json's.
    mesh: place each parameter with its logical sharding on this mesh.
    remat: recompute blocks in the backward pass.
    attention_impl: ``einsum``, ``splash`` or ``auto`` (see ``models.attention``).
  """
  ckpt = resolve_checkpoint(path)
  cfg = with_dtype(ModelConfig.from_hf_config(read_json(f"{ckpt}/config.json")), dtype)
  tensors = _TensorIndex(ckpt)
  model = abstract_model(cfg, remat=remat, attention_impl=attention_impl)
  params = _params(model)
  _check_no_unused_tensors(ckpt, cfg, tensors.weight_map,
                           {_hf_tensor(path_, cfg)[0] for path_, _ in params})
  for path_, var in params:
    name, to_model, to_hf = _hf_tensor(path_, cfg)
    if name == "lm_head.weight" and name not in tensors.weight_map and not cfg.tie_word_embeddings:
      raise KeyError(f"{ckpt} has no tensor {name!r}, and tie_word_embeddings is false.")
    try:
      f = tensors.file(name)
    except KeyError:
      raise KeyError(
          f"{ckpt} has no tensor {name!r}, which a {cfg.model_type} model with this "
          "config.json needs; the checkpoint is incomplete or of another architecture."
      ) from None
    expected = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(var.shape, np.int8)).shape
    if f.shape(name) != expected:
      raise ValueError(
          f"tensor {name!r} in {ckpt} has shape {f.shape(name)}, but config.json implies "
          f"{expected}; config.json and the weights disagree."
      )
    host = to_model(f.get(name))
    axes = var.get_metadata()["logical_axes"]
    var.set_value(_place(host.astype(cfg.param_dtype), axes, mesh))
  log.info("loaded %s (%s, %.2fB params, %s)", ckpt, cfg.model_type, cfg.num_params() / 1e9,
           cfg.dtype)
  return model


_NOT_PARAMETERS = re.compile(r".*\.rotary_emb\.inv_freq$")
"""Buffers some checkpoints also hold; recomputed from config.json, never read."""


def _check_no_unused_tensors(ckpt: str, cfg: ModelConfig, names, used: set[str]) -> None:
  """Raises when the checkpoint holds tensors the model built from config.json would not read.

  Such tensors mean that config.json does not describe the weights: a Qwen2 checkpoint whose
  config says ``llama`` would load with its q/k/v biases silently dropped.
  """
  unused = sorted(n for n in names if n not in used and not _NOT_PARAMETERS.match(n)
                  and not (n == "lm_head.weight" and cfg.tie_word_embeddings))
  if unused:
    shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
    raise ValueError(
        f"{ckpt} holds {len(unused)} tensors that a {cfg.model_type} model built from its "
        f"config.json does not use: {shown}. config.json does not describe these weights "
        f"(model_type={cfg.model_type!r}, attention_bias, qk-norm and tied embeddings follow "
        "from it); fix config.json to the architecture the weights were saved from.")


def _place(host: np.ndarray, axes, mesh) -> jax.Array:
  if mesh is None:
    return jax.device_put(host)
  sharding = mesh_lib.named_sharding(axes, host.shape, mesh)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_pretrained(
    model: Transformer,
    path: str,
    *,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
  """Writes ``model`` as an HF checkpoint (safetensors + config.json).

  Shards into ``model-0000i-of-0000n.safetensors`` with an index above
  ``max_shard_bytes``. Tokenizer files are copied from ``tokenizer_dir``.
  Only process 0 writes; every process takes part in gathering.
  """
  cfg = model.cfg
  path = str(path).rstrip("/")
  write = jax.process_index() == 0
  if write:
    fsspec.open(f"{path}/config.json").fs.makedirs(path, exist_ok=True)
  shards, current, size = [], [], 0
  for path_, var in _params(model):
    name, _, to_hf = _hf_tensor(path_, cfg)
    host = to_hf(_to_host(var[...]))
    nbytes = host.size * host.dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, host))
    size += nbytes
  shards.append(current)
  if not write:
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = (
        "model.safetensors" if len(shards) == 1
        else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    )
    write_safetensors(f"{path}/{fname}", shard)
    weight_map.update({name: fname for name, _ in shard})
  if len(shards) > 1:
    total = sum(a.size * a.dtype.itemsize for s in shards for _, a in s)
    _write_json(f"{path}/model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  _write_json(f"{path}/config.json", cfg.to_hf_config())
  if tokenizer_dir:
    src_dir = resolve_checkpoint(tokenizer_dir, marker=None)
    for fname in TOKENIZER_FILES:
      src = f"{src_dir}/{fname}"
      if fsspec.open(src).fs.exists(src):
        with fsspec.open(src, "rb") as fi, fsspec.open(f"{path}/{fname}", "wb") as fo:
          shutil.copyfileobj(fi, fo)


def _write_json(path: str, obj) -> None:
  with fsspec.open(path, "w") as f:
    json.dump(obj, f, indent=2)
