"""Hugging Face checkpoints in and out: ``from_pretrained`` / ``save_pretrained``.

A checkpoint is a directory (local, gs://, or a hub id resolved through
``huggingface_hub``) with ``config.json`` and one or more ``*.safetensors``
files (with ``model.safetensors.index.json`` when sharded). Loading goes
tensor by tensor: each HF tensor is read (memory-mapped where local),
converted to the model's layout and dtype, and placed straight onto the mesh
with ``jax.make_array_from_callback``, so every device reads only its shard.
Writing (``write_hf_checkpoint``, behind ``save_pretrained`` and ``tropd_jax.export``) plans the
files from the shapes, then fetches and writes one file's tensors at a time with the
``safetensors`` library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import re
import shutil
from collections.abc import Callable, Sequence

import fsspec
import jax
import numpy as np
from flax import nnx

from tropd_jax import cli
from tropd_jax import mesh as mesh_lib
from tropd_jax.models.config import ModelConfig
from tropd_jax.models.safetensors_io import SafetensorsFile, is_local, write_safetensors
from tropd_jax.models.tokenizer import TOKENIZER_FILES
from tropd_jax.models.transformer import Transformer, abstract_model, with_dtype

log = logging.getLogger(__name__)

EXTRA_FILES = TOKENIZER_FILES + ("generation_config.json",)
"""Files besides the weights that an exported checkpoint takes from the source checkpoint."""
DEFAULT_MAX_SHARD_BYTES = 10**9
READ_GROUP_BYTES = 64 * 1024**2
"""Bytes of parameters fetched to the host at once while writing (a larger tensor alone)."""
_MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")


def resolve_checkpoint(path: str, *, marker: str | None = "config.json",
                       files: Sequence[str] = _MODEL_FILES) -> str:
  """A readable directory for ``path``: local dir, gs:// URL or HF hub id.

  Args:
    path: the checkpoint.
    marker: a file the directory must hold (None: any directory).
    files: for a hub id, the file patterns to download (default: config, weights, tokenizer);
      the tokenizer alone is fetched with ``TOKENIZER_FILES``.
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

      return snapshot_download(path, allow_patterns=list(files))
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


def model_params(model: Transformer) -> list[tuple[tuple, nnx.Param]]:
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
  params = model_params(model)
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


def to_host(x: jax.Array) -> np.ndarray:
  """``x`` as one host array (gathered from every process on multi-host meshes)."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


# --- Writing -------------------------------------------------------------------

ParamPath = tuple
ReadFn = Callable[[Sequence[ParamPath]], dict[ParamPath, np.ndarray]]
"""``read(paths) -> {path: host array}``: parameters in the model's layout and the written dtype."""


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One parameter as an HF checkpoint stores it.

  Attributes:
    path: the parameter's path in the ``Transformer`` (``("blocks", 0, "mlp", "up_DF")``).
    name: its HF name (``model.layers.0.mlp.up_proj.weight``).
    shape: its shape in the model's layout.
    to_hf: the model-layout -> HF-layout conversion (transposes, reshapes).
  """

  path: ParamPath
  name: str
  shape: tuple[int, ...]
  to_hf: Callable[[np.ndarray], np.ndarray]


def hf_tensors(cfg: ModelConfig) -> list[HFTensor]:
  """Every parameter of a ``cfg`` model with its HF name and layout, in the model's order."""
  out = []
  for path_, var in model_params(abstract_model(cfg)):
    name, _, to_hf = _hf_tensor(path_, cfg)
    out.append(HFTensor(path_, name, tuple(var.shape), to_hf))
  return out


def num_bytes(cfg: ModelConfig) -> int:
  """Bytes of a ``cfg`` model's parameters in ``cfg.dtype``."""
  itemsize = np.dtype(cfg.param_dtype).itemsize
  return sum(math.prod(t.shape) for t in hf_tensors(cfg)) * itemsize


def shard_file_names(num_shards: int) -> list[str]:
  """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` (transformers' names)."""
  if num_shards == 1:
    return ["model.safetensors"]
  return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def plan_shards(nbytes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
  """Consecutive tensors (by index) grouped into files of at most ``max_shard_bytes``.

  A tensor larger than the limit gets a file of its own, as in ``transformers``.
  """
  if max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1.")
  shards, current, size = [], [], 0
  for i, n in enumerate(nbytes):
    if current and size + n > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(i)
    size += n
  return shards + [current] if current else shards


def _read_groups(indices: Sequence[int], nbytes: Sequence[int], budget: int) -> list[list[int]]:
  """``indices`` in groups of about ``budget`` bytes, largest tensors first.

  Largest first: the big transient of reading the embedding comes while little of the file is
  held yet, so the peak stays near the file's own bytes.
  """
  groups, current, size = [], [], 0
  for i in sorted(indices, key=lambda j: -nbytes[j]):
    if current and size + nbytes[i] > budget:
      groups.append(current)
      current, size = [], 0
    current.append(i)
    size += nbytes[i]
  return groups + [current] if current else groups


def _check_empty(path: str, fs, names: Sequence[str]) -> None:
  """Refuses a directory holding weights that the new files would not replace (a stale mix)."""
  fpath = fsspec.core.url_to_fs(path)[1]
  present = {posixpath.basename(f) for f in fs.glob(f"{fpath}/*.safetensors")}
  if fs.exists(f"{fpath}/model.safetensors.index.json"):
    present.add("model.safetensors.index.json")
  stale = sorted(present - set(names))
  if stale:
    raise FileExistsError(
        f"{path} already holds {', '.join(stale)} from another checkpoint; write to a new "
        "directory (or remove those files).")


def write_hf_checkpoint(
    path: str,
    cfg: ModelConfig,
    read: ReadFn,
    *,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    read_group_bytes: int = READ_GROUP_BYTES,
) -> list[str]:
  """Writes an HF checkpoint of a ``cfg`` model whose parameters ``read`` fetches.

  Files are planned from the shapes alone (sharded above ``max_shard_bytes``, with
  ``model.safetensors.index.json``, as ``save_pretrained`` in ``transformers``), then filled one
  at a time: each file's parameters are read in groups of about ``read_group_bytes``, turned into
  the HF layout and written with the ``safetensors`` library, so the host holds one file's
  tensors at most. ``config.json`` is written last: a directory cut short by a failure has none
  and is not mistaken for a checkpoint. Tokenizer and generation-config files are copied from
  ``tokenizer_dir``.

  Every process calls ``read`` (its gathers are collective); only process 0 writes.

  Args:
    path: the output directory (local or fsspec URL).
    cfg: the model's config; its ``dtype`` is the dtype written (config.json and tensors).
    read: fetches parameters (see ``ReadFn``), in ``cfg.dtype``.
    tokenizer_dir: checkpoint directory or hub id whose tokenizer files are copied.
    max_shard_bytes: the most bytes of tensors per file.
    read_group_bytes: the most bytes of tensors fetched by one ``read`` call (a larger tensor
      is fetched alone).

  Returns:
    The names of the weight files written.
  """
  path = str(path).rstrip("/")
  tensors = hf_tensors(cfg)
  itemsize = np.dtype(cfg.param_dtype).itemsize
  nbytes = [math.prod(t.shape) * itemsize for t in tensors]
  shards = plan_shards(nbytes, max_shard_bytes)
  names = shard_file_names(len(shards))
  write = jax.process_index() == 0
  fs = fsspec.core.url_to_fs(path)[0]
  if write:
    _check_empty(path, fs, names + (["model.safetensors.index.json"] if len(shards) > 1 else []))
    fs.makedirs(fsspec.core.url_to_fs(path)[1], exist_ok=True)
  weight_map = {}
  for fname, shard in zip(names, shards):
    arrays = {}
    for group in _read_groups(shard, nbytes, read_group_bytes):
      host = read([tensors[i].path for i in group])
      for i in group:
        t, a = tensors[i], host.pop(tensors[i].path)
        if a.shape != t.shape or a.dtype != cfg.param_dtype:
          raise ValueError(f"parameter {'/'.join(map(str, t.path))} came as {a.dtype}{a.shape}, "
                           f"expected {np.dtype(cfg.param_dtype)}{t.shape}.")
        arrays[t.name] = np.ascontiguousarray(t.to_hf(a))
        del a
    if write:
      write_safetensors(f"{path}/{fname}", arrays)
    weight_map.update({name: fname for name in arrays})
    del arrays
  if write:
    if len(shards) > 1:
      _write_json(f"{path}/model.safetensors.index.json",
                  {"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map})
    if tokenizer_dir:
      src_dir = resolve_checkpoint(tokenizer_dir, marker=None, files=EXTRA_FILES)
      for fname in EXTRA_FILES:
        src = f"{src_dir}/{fname}"
        if fsspec.open(src).fs.exists(src):
          with fsspec.open(src, "rb") as fi, fsspec.open(f"{path}/{fname}", "wb") as fo:
            shutil.copyfileobj(fi, fo)
    _write_json(f"{path}/config.json", cfg.to_hf_config())
  return names


def save_pretrained(
    model: Transformer,
    path: str,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
  """Writes ``model`` as an HF checkpoint (safetensors + config.json) with ``write_hf_checkpoint``.

  Args:
    model: the model (sharded or not).
    path: the output directory (local or fsspec URL).
    dtype: the dtype written (``bfloat16``, ``float32``); default the model's.
    tokenizer_dir: where to copy tokenizer files from.
    max_shard_bytes: shard into ``model-0000i-of-0000n.safetensors`` with an index above this.
  """
  cfg = with_dtype(model.cfg, dtype)
  values = dict(model_params(model))

  def read(paths):
    return {p: to_host(values[p][...]).astype(cfg.param_dtype, copy=False) for p in paths}

  write_hf_checkpoint(path, cfg, read, tokenizer_dir=tokenizer_dir,
                      max_shard_bytes=max_shard_bytes)


def _write_json(path: str, obj) -> None:
  with fsspec.open(path, "w") as f:
    json.dump(obj, f, indent=2)
