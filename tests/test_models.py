"""Models against transformers: logits parity, HF round trip, sharded loading, errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from hf_fixtures import make_hf_model, make_tokenizer, to_legacy
from tropd_jax import mesh as mesh_lib
from tropd_jax import models
from tropd_jax.models import hf_io
from tropd_jax.models.safetensors_io import SafetensorsFile, write_safetensors

TOL = 1e-4


def _batch(vocab=97, b=3, t=11, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (b, t))
  mask = np.ones((b, t), bool)
  mask[1, :4] = False  # left padding
  mask[2, -3:] = False  # right padding
  return ids, mask


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()


def _assert_close_on_real(ours, ref, mask):
  np.testing.assert_allclose(np.asarray(ours)[mask], ref[mask], atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "kind,tie,kv_heads,legacy",
    [
        ("qwen2", False, 2, False),
        ("qwen2", True, 4, True),
        ("qwen3", True, 1, False),
        ("qwen3", False, 2, True),
        ("llama", False, 4, False),
        ("llama", True, 1, True),
    ],
)
def test_logits_match_transformers(tmp_path, kind, tie, kv_heads, legacy):
  ref_model = make_hf_model(tmp_path, kind, tie=tie, kv_heads=kv_heads, legacy=legacy)
  model = models.from_pretrained(str(tmp_path), dtype="float32")
  assert model.cfg.num_heads // model.cfg.num_kv_heads == 4 // kv_heads
  assert model.cfg.tie_word_embeddings == tie
  ids, mask = _batch()
  ours = model(jnp.asarray(ids), mask_BT=jnp.asarray(mask))
  _assert_close_on_real(ours, _torch_logits(ref_model, ids, mask), mask)


def test_config_layouts_agree(tmp_path):
  make_hf_model(tmp_path / "new", "llama")
  make_hf_model(tmp_path / "old", "llama", legacy=True)
  new = models.ModelConfig.from_hf_config(str(tmp_path / "new" / "config.json"))
  old = models.ModelConfig.from_hf_config(str(tmp_path / "old" / "config.json"))
  assert new == old
  assert new.rope_scaling.rope_type == "llama3" and new.rope_theta == 500_000.0
  with open(tmp_path / "old" / "config.json") as f:
    assert "rope_parameters" not in json.load(f)


def test_hidden_and_head_give_logits(tmp_path):
  make_hf_model(tmp_path, "qwen3", tie=True)
  model = models.from_pretrained(str(tmp_path), dtype="float32")
  ids, mask = _batch()
  h_BTD, kv = model.hidden(jnp.asarray(ids), mask_BT=jnp.asarray(mask))
  assert h_BTD.shape == (3, 11, 32) and len(kv) == model.cfg.num_layers
  w_VD = model.head_weight()
  assert w_VD.shape == (97, 32)
  np.testing.assert_allclose(
      jnp.einsum("BTD,VD->BTV", h_BTD, w_VD), model(jnp.asarray(ids), mask_BT=jnp.asarray(mask)),
      atol=1e-5)


def test_paged_prefill_then_decode_matches_full_forward(tmp_path):
  """Rows of different context lengths: prefill into pages, then decode token by token."""
  make_hf_model(tmp_path, "qwen2")
  model = models.from_pretrained(str(tmp_path), dtype="float32")
  ids, _ = _batch(t=10)
  contexts = np.array([7, 4, 6])
  full = np.asarray(model(jnp.asarray(ids)))
  cache = model.init_cache(num_pages=16, page_size=4, num_slots=3, max_pages_per_row=3)
  table = np.array([[5, 2, 9], [1, 7, 3], [12, 4, 8]], np.int32)  # any free pages, in any order
  cache = dataclasses.replace(cache, page_table_BP=jnp.asarray(table))
  h, cache = model.prefill(jnp.asarray(np.where(np.arange(10) < contexts[:, None], ids, 0)),
                           jnp.asarray(contexts), cache)
  np.testing.assert_allclose(model.logits(h[:, None])[:, 0], full[np.arange(3), contexts - 1],
                             atol=1e-5)
  lengths = contexts.copy()
  for _ in range(3):
    cache = dataclasses.replace(cache, lengths_B=jnp.asarray(lengths, jnp.int32))
    h, cache = model.decode(jnp.asarray(ids[np.arange(3), lengths]), cache, impl="xla")
    np.testing.assert_allclose(model.logits(h[:, None])[:, 0], full[np.arange(3), lengths],
                               atol=1e-5)
    lengths += 1


@pytest.mark.parametrize("max_shard_bytes", [hf_io.DEFAULT_MAX_SHARD_BYTES, 20_000])
def test_save_pretrained_round_trip(tmp_path, max_shard_bytes):
  ref_model = make_hf_model(tmp_path / "src", "qwen2", tie=False)
  make_tokenizer(tmp_path / "src")
  model = models.from_pretrained(str(tmp_path / "src"), dtype="float32")
  out = tmp_path / "out"
  models.save_pretrained(model, str(out), tokenizer_dir=str(tmp_path / "src"),
                         max_shard_bytes=max_shard_bytes)
  sharded = os.path.exists(out / "model.safetensors.index.json")
  assert sharded == (max_shard_bytes < hf_io.DEFAULT_MAX_SHARD_BYTES)
  assert os.path.exists(out / "tokenizer.json")
  reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  ids, mask = _batch()
  _assert_close_on_real(
      _torch_logits(reloaded_hf, ids, mask), _torch_logits(ref_model, ids, mask), mask)
  reloaded = models.from_pretrained(str(out))
  _assert_close_on_real(reloaded(jnp.asarray(ids), mask_BT=jnp.asarray(mask)),
                        _torch_logits(ref_model, ids, mask), mask)


def test_bfloat16_parameters(tmp_path):
  ref_model = make_hf_model(tmp_path, "qwen3")
  model = models.from_pretrained(str(tmp_path), dtype="bfloat16")
  assert model.blocks[0].mlp.up_DF[...].dtype == jnp.bfloat16
  ids, mask = _batch()
  ours = model(jnp.asarray(ids), mask_BT=jnp.asarray(mask))
  assert ours.dtype == jnp.float32
  err = np.abs(np.asarray(ours)[mask] - _torch_logits(ref_model, ids, mask)[mask]).max()
  assert err < 0.1


@pytest.mark.parametrize("shape", [dict(fsdp=4, tensor=2), dict(data=8, fsdp=1)])
def test_sharded_loading(tmp_path, shape):
  ref_model = make_hf_model(tmp_path, "qwen2", vocab=128, kv_heads=2)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**shape))
  model = models.from_pretrained(str(tmp_path), dtype="float32", mesh=mesh)
  up = model.blocks[0].mlp.up_DF[...]
  q = model.blocks[0].attn.q_DNH[...]
  embed = model.embed_VD[...]
  if shape.get("tensor", 1) == 2:
    assert up.sharding.spec == P("fsdp", "tensor")
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert embed.sharding.spec == P("tensor", "fsdp")
  else:
    assert all(s is None for s in up.sharding.spec)
  expected = jax.tree.leaves(models.param_shardings(model, mesh))
  actual = [v.sharding for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
  assert actual == expected
  ids, mask = _batch(vocab=128, b=8)
  with jax.set_mesh(mesh):
    ours = jax.jit(lambda m, i, k: m(i, mask_BT=k))(model, jnp.asarray(ids), jnp.asarray(mask))
  _assert_close_on_real(ours, _torch_logits(ref_model, ids, mask), mask)


def test_random_init_is_sharded_eagerly():
  cfg = models.ModelConfig(model_type="qwen3", vocab_size=64, d_model=32, d_ff=64, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(fsdp=4, tensor=2))
  model = models.init_model(cfg, mesh=mesh)
  assert model.blocks[0].mlp.down_FD[...].sharding.spec == P("tensor", "fsdp")
  assert model.embed_VD[...].sharding.spec == P("tensor", "fsdp")


# --- Errors ------------------------------------------------------------------

def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    models.from_pretrained(str(tmp_path / "nowhere" / "model"))


def test_missing_tensor(tmp_path):
  make_hf_model(tmp_path, "qwen2", layers=1)
  f = SafetensorsFile(str(tmp_path / "model.safetensors"))
  kept = [(k, np.array(f.get(k))) for k in f.keys() if "up_proj" not in k]
  del f
  write_safetensors(str(tmp_path / "model.safetensors"), kept)
  with pytest.raises(KeyError, match="model.layers.0.mlp.up_proj.weight"):
    models.from_pretrained(str(tmp_path))


def test_shape_disagrees_with_config(tmp_path):
  make_hf_model(tmp_path, "qwen2", layers=1)
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  hf["intermediate_size"] = 64
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match=r"down_proj.weight.* has shape \(32, 48\), but config.json implies \(32, 64\)"):
    models.from_pretrained(str(tmp_path))


def test_unknown_model_type(tmp_path):
  make_hf_model(tmp_path, "qwen2", layers=1)
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  hf["model_type"] = "gpt_neox"
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match="model_type='gpt_neox'.*not supported"):
    models.from_pretrained(str(tmp_path))


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
    models.ModelConfig.preset("qwen9")
  assert models.ModelConfig.preset("deepseek_r1_distill_qwen_1p5b").num_params() == pytest.approx(
      1.78e9, rel=0.01)
  assert models.ModelConfig.preset("qwen3_1p7b").num_params() == pytest.approx(1.72e9, rel=0.01)


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="needs 6 devices, but 8"):
    mesh_lib.MeshConfig(data=3, fsdp=2, tensor=1).shape(8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_lib.MeshConfig(data=-1, fsdp=-1).shape(8)
  assert mesh_lib.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)


# --- Tokenizer -----------------------------------------------------------------

def test_tokenizer_chat_template_and_shared_check(tmp_path):
  make_tokenizer(tmp_path / "a")
  make_tokenizer(tmp_path / "b")
  make_tokenizer(tmp_path / "c", corpus=["completely different words here"] * 20)
  a, b, c = (models.load_tokenizer(str(tmp_path / n)) for n in "abc")
  ids = a.encode_prompt("the cat")
  assert a.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
  assert a.hf.convert_tokens_to_ids("<|im_end|>") in a.stop_ids
  assert models.check_same_tokenizer(a, b, 128, 97) == a.vocab_size
  with pytest.raises(ValueError, match=r"teacher tokenizer \(.*a.*\) and student tokenizer \(.*c"):
    models.check_same_tokenizer(a, c, 97, 97)
  with pytest.raises(ValueError, match="student embedding has 10 rows"):
    models.check_same_tokenizer(a, b, 97, 10)


def test_missing_tokenizer(tmp_path):
  make_hf_model(tmp_path, "qwen2", layers=1)
  with pytest.raises(FileNotFoundError, match="has no tokenizer"):
    models.load_tokenizer(str(tmp_path))


def test_remote_file_system_round_trip(tmp_path):
  """The gs:// code path (fsspec byte ranges, no memory map), on fsspec's in-memory file system."""
  import fsspec

  ref_model = make_hf_model(tmp_path, "qwen3", tie=True)
  make_tokenizer(tmp_path)
  fs = fsspec.filesystem("memory")
  for name in os.listdir(tmp_path):
    fs.pipe(f"/remote_src/{name}", (tmp_path / name).read_bytes())
  model = models.from_pretrained("memory://remote_src", dtype="float32")
  ids, mask = _batch()
  _assert_close_on_real(model(jnp.asarray(ids), mask_BT=jnp.asarray(mask)),
                        _torch_logits(ref_model, ids, mask), mask)
  models.save_pretrained(model, "memory://remote_out", tokenizer_dir="memory://remote_src",
                         max_shard_bytes=20_000)
  assert fs.exists("/remote_out/model.safetensors.index.json")
  assert models.load_tokenizer("memory://remote_out").vocab_size == models.load_tokenizer(
      str(tmp_path)).vocab_size
  again = models.from_pretrained("memory://remote_out")
  _assert_close_on_real(again(jnp.asarray(ids), mask_BT=jnp.asarray(mask)),
                        _torch_logits(ref_model, ids, mask), mask)
