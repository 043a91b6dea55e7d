"""Hugging Face export/import: bitwise round trip, SPEC §9 names and shapes, Qwen2 import, clear errors."""

import dataclasses
import json
import os
import shutil

import ml_dtypes
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nextstep_jax import export as export_cli
from nextstep_jax import run as run_lib
from nextstep_jax.interop import runs
from nextstep_jax.interop import hf
from nextstep_jax.interop import safetensors_io
from nextstep_jax.interop.params import load_pure_params, pure_params
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import nextstep as ns
from tests.tolerance import assert_close_fp32

BB = bb.BackboneConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, rope_theta=10000.0)
CFG = ns.NextStepConfig(backbone=BB, head=fm_head.HeadConfig(dim=64, num_layers=2, cond_dim=64, token_dim=8),
                        token_dim=8)
META = hf.ImageMeta(latent_channels=2, latent_patch_size=2, latent_size=8, boi=2, eoi=3, image_placeholder_id=4,
                    image_area_id=1, eos_token_id=10, pad_token_id=0)


def _model(cfg=CFG, seed=0):
  """A model with every parameter random (no zero or one left to hide a mapping mistake)."""
  model = nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  load_pure_params(model, params)
  return model


def expected_shapes(hidden, heads, kv, hd, mlp, vocab, layers, head_dim, head_layers, token_dim):
  """SPEC §9, written out independently of interop/names.py. Linear weights are [out, in]."""
  s = {"embed_tokens.weight": (vocab, hidden)}
  for i in range(layers):
    p = f"layers.{i}."
    s.update({p + "input_layernorm.weight": (hidden,),
              p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.q_proj.bias": (heads * hd,),
              p + "self_attn.k_proj.weight": (kv * hd, hidden), p + "self_attn.k_proj.bias": (kv * hd,),
              p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.v_proj.bias": (kv * hd,),
              p + "self_attn.o_proj.weight": (hidden, heads * hd),
              p + "post_attention_layernorm.weight": (hidden,),
              p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
              p + "mlp.down_proj.weight": (hidden, mlp)})
  s.update({"norm.weight": (hidden,), "lm_head.weight": (vocab, hidden),
            "image_in_projector.weight": (hidden, token_dim), "image_in_projector.bias": (hidden,),
            "image_out_projector.weight": (hidden, hidden), "image_out_projector.bias": (hidden,)})
  n = "image_head.net."
  d = head_dim
  s.update({n + "time_embed.mlp.0.weight": (d, 256), n + "time_embed.mlp.0.bias": (d,),
            n + "time_embed.mlp.2.weight": (d, d), n + "time_embed.mlp.2.bias": (d,),
            n + "cond_embed.weight": (d, hidden), n + "cond_embed.bias": (d,),
            n + "input_proj.weight": (d, token_dim), n + "input_proj.bias": (d,)})
  for m in range(head_layers):
    r = f"{n}res_blocks.{m}."
    s.update({r + "in_ln.weight": (d,), r + "in_ln.bias": (d,), r + "mlp.0.weight": (d, d), r + "mlp.0.bias": (d,),
              r + "mlp.2.weight": (d, d), r + "mlp.2.bias": (d,), r + "adaLN_modulation.1.weight": (3 * d, d),
              r + "adaLN_modulation.1.bias": (3 * d,)})
  s.update({n + "final_layer.linear.weight": (token_dim, d), n + "final_layer.linear.bias": (token_dim,),
            n + "final_layer.adaLN_modulation.1.weight": (2 * d, d),
            n + "final_layer.adaLN_modulation.1.bias": (2 * d,)})
  return s


def test_export_then_import_is_bitwise(tmp_path):
  model = _model()
  out = str(tmp_path / "hf")
  index = hf.export_nextstep(model, CFG, out, META, max_shard_bytes=200_000)
  files = sorted(os.listdir(out))
  shards = [f for f in files if f.endswith(".safetensors")]
  n = len(shards)
  assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert set(index["weight_map"].values()) == set(shards)
  with open(os.path.join(out, safetensors_io.INDEX_FILE)) as f:
    assert json.load(f) == index
  total = sum(safetensors_io.SafetensorsFile(os.path.join(out, s)).get(k).nbytes
              for k, s in index["weight_map"].items())
  assert index["metadata"]["total_size"] == total

  loaded, meta = hf.load_nextstep(out)
  # Our export carries the official model's 32 x 32 gen_pos_embed table (checked on import).
  assert meta == dataclasses.replace(META, gen_pos_grid=hf.GEN_POS_GRID_V1) and loaded.config == CFG
  assert index["weight_map"][hf.GEN_POS_EMBED]
  a, b = pure_params(model), pure_params(loaded)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))

  # The official safetensors reader agrees with ours on our files.
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  for s in shards:
    ref = safetensors_numpy.load_file(os.path.join(out, s))
    ours = safetensors_io.load_safetensors(os.path.join(out, s))
    assert sorted(ref) == sorted(ours)
    for k in ref:
      np.testing.assert_array_equal(ref[k], ours[k])

  # config.json: Qwen2/Llama fields plus the NextStep-1 fields.
  with open(os.path.join(out, "config.json")) as f:
    c = json.load(f)
  assert c["hidden_size"] == 64 and c["num_hidden_layers"] == 2 and c["num_attention_heads"] == 4
  assert c["num_key_value_heads"] == 2 and c["intermediate_size"] == 128 and c["vocab_size"] == 64
  assert c["rope_theta"] == 10000.0 and c["tie_word_embeddings"] is False
  assert (c["latent_size"], c["latent_patch_size"], c["latent_channels"]) == (8, 2, 2)
  assert (c["boi"], c["eoi"], c["image_placeholder_id"]) == (2, 3, 4)
  assert (c["lm_loss_weight"], c["im_loss_weight"]) == (0.01, 1.0)
  assert (c["fm_head_dim"], c["fm_head_layers"], c["fm_head_batch_mul"]) == (64, 2, 4)


def test_bfloat16_export_rounds_once(tmp_path):
  model = _model(seed=1)
  out = str(tmp_path / "hf16")
  hf.export_nextstep(model, CFG, out, META, dtype="bfloat16")
  f = safetensors_io.TensorDir(out)
  assert f.get("lm_head.weight").dtype == ml_dtypes.bfloat16
  loaded, _ = hf.load_nextstep(out)
  for x, y in zip(jax.tree.leaves(pure_params(model)), jax.tree.leaves(pure_params(loaded))):
    want = np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(y), want)


def test_names_and_shapes_are_spec_9(tmp_path):
  out = str(tmp_path / "hf")
  index = hf.export_nextstep(_model(), CFG, out, META)
  # SPEC §9: the official model also saves gen_pos_embed, the 32 x 32 sin-cos table (1, 1024, hidden).
  want = {**expected_shapes(64, 4, 2, 16, 128, 64, 2, 64, 2, 8), "gen_pos_embed": (1, 1024, 64)}
  assert set(index["weight_map"]) == set(want)
  files = safetensors_io.TensorDir(out)
  assert {k: tuple(files.shape(k)) for k in files.names()} == want

  # The 14B preset with the base head, abstractly (nothing materialised).
  c14 = bb.BackboneConfig(vocab_size=152064, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8,
                          head_dim=128, intermediate_size=13824, rms_norm_eps=1e-5)
  cfg14 = ns.NextStepConfig(backbone=c14, head=fm_head.HeadConfig(dim=1536, num_layers=12, cond_dim=5120,
                                                                  token_dim=64), token_dim=64)
  got = hf.checkpoint_shapes(cfg14)
  want14 = expected_shapes(5120, 40, 8, 128, 13824, 152064, 48, 1536, 12, 64)
  assert got == want14
  n_params = sum(int(np.prod(s)) for s in got.values())
  assert n_params == 14_770_033_664 + 157_228_096 + (64 * 5120 + 5120) + (5120 * 5120 + 5120)


# ---------------------------------------------------------------------------------------------
# Qwen2.5 import
# ---------------------------------------------------------------------------------------------

def _save_hf_qwen2(path, tie=False):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(
      vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
      intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
      max_position_embeddings=256)
  model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # random biases and norm weights, so a wrong mapping cannot hide behind zeros/ones
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(path, safe_serialization=True)
  return torch, model


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parity
def test_qwen2_import_gives_transformers_logits(tmp_path, tie):
  path = str(tmp_path / "qwen")
  torch, ref = _save_hf_qwen2(path, tie)
  assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(path))
  c = hf.qwen2_config(path)
  assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
          c.intermediate_size, c.rope_theta) == (96, 64, 3, 4, 2, 16, 96, 10000.0)
  params = hf.import_qwen2_backbone(path, c)
  backbone = nnx.eval_shape(lambda: bb.Backbone(c, rngs=nnx.Rngs(0)))
  load_pure_params(backbone, params, path)
  tokens = np.random.default_rng(0).integers(0, 96, size=(2, 17))
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(backbone.forward_logits(jnp.asarray(tokens)))
  assert_close_fp32(got, want, rtol=1e-4)  # parity: 1e-4 of the logits' magnitude (about 0.5; was atol=1e-4)
  # An experiment config whose sizes disagree with config.json is refused, naming the fields.
  import dataclasses
  with pytest.raises(safetensors_io.CheckpointError, match=r"hidden_size: config 32 vs checkpoint 64"):
    hf.import_qwen2_backbone(path, dataclasses.replace(c, hidden_size=32))
  # Runtime fields come from the given config.
  assert hf.qwen2_config(path, {"dtype": "bfloat16", "remat": "full"}).dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------

def test_damaged_directories_give_clear_errors(tmp_path):
  out = str(tmp_path / "hf")
  index = hf.export_nextstep(_model(), CFG, out, META, max_shard_bytes=200_000)
  shard = sorted(set(index["weight_map"].values()))[-1]

  def copy(name):
    d = str(tmp_path / name)
    shutil.copytree(out, d)
    return d

  # Truncated shard: names the file and a tensor whose bytes are gone.
  d = copy("truncated")
  path = os.path.join(d, shard)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1000)
  with pytest.raises(safetensors_io.CheckpointError, match=rf"{shard}: truncated file: tensor \S+ needs bytes"):
    hf.load_nextstep(d)
  with open(path, "r+b") as f:
    f.truncate(5)
  with pytest.raises(safetensors_io.CheckpointError, match=rf"{shard}: truncated safetensors file"):
    hf.load_nextstep(d)

  # A tensor missing from the index.
  d = copy("missing")
  with open(os.path.join(d, safetensors_io.INDEX_FILE)) as f:
    idx = json.load(f)
  del idx["weight_map"]["layers.1.mlp.up_proj.weight"]
  with open(os.path.join(d, safetensors_io.INDEX_FILE), "w") as f:
    json.dump(idx, f)
  with pytest.raises(safetensors_io.CheckpointError, match=r"tensor layers.1.mlp.up_proj.weight is missing"):
    hf.load_nextstep(d)

  # config.json that does not match the tensors: the misshapen tensor and its file are named.
  d = copy("misshapen")
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({**cfg, "intermediate_size": 96}, f)
  with pytest.raises(safetensors_io.CheckpointError, match=r"model-\d+-of-\d+.safetensors: tensor layers.0.mlp.gate_proj.weight "
                                               r"has shape \[128, 64\], config.json implies \[96, 64\]"):
    hf.load_nextstep(d)

  # Bad config.json: invalid JSON, a missing field, a wrong type.
  for name, text, pattern in [("badjson", "{not json", r"config.json: not valid JSON"),
                              ("nofield", json.dumps({k: v for k, v in cfg.items() if k != "fm_head_dim"}),
                               r"config.json has no field 'fm_head_dim'"),
                              ("badtype", json.dumps({**cfg, "hidden_size": "64"}),
                               r"config.json field 'hidden_size' = '64' is not a int")]:
    d = copy(name)
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write(text)
    with pytest.raises(safetensors_io.CheckpointError, match=pattern):
      hf.load_nextstep(d)

  # Pickles are never read.
  d = str(tmp_path / "pickle")
  os.makedirs(d)
  with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x04not loaded")
  with pytest.raises(safetensors_io.CheckpointError, match="PyTorch pickles are never loaded"):
    safetensors_io.TensorDir(d)


# ---------------------------------------------------------------------------------------------
# The command line: a run's checkpoint -> HF directory -> params-only checkpoint
# ---------------------------------------------------------------------------------------------

class _Tok:
  """The token-id fields and save() of nextstep_jax.data.tokenizer.Tokenizer."""
  boi_id, eoi_id, placeholder_id, area_id, eos_id, pad_id = 2, 3, 4, 1, 10, 0

  def save(self, directory):
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
      f.write(b"fake tokenizer")


def test_command_line_export_and_import(tmp_path, monkeypatch):
  import ml_collections
  from nextstep_jax.training import checkpoint as ckpt_lib
  config = ml_collections.ConfigDict(dict(
      seed=0, workdir=str(tmp_path / "run"),
      model=dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-6, dtype="float32",
                 param_dtype="float32", remat="none", attention="xla", document_mask=True),
      head=dict(dim=64, num_layers=2, batch_mul=4), image=dict(latent_channels=2, patch_size=2, vae_factor=4,
                                                              token_norm=True, token_dim=8),
      loss=dict(ce_weight=0.01, fm_weight=1.0), data=dict(image_size=32), tokenizer=dict(path=""),
      vae=dict(checkpoint="")))
  model = _model()
  params = pure_params(model)
  with ckpt_lib.Checkpointer(os.path.join(config.workdir, "checkpoints"), every=1, keep=1, async_save=False,
                             config=config) as ckpt:
    ckpt.save(7, {"params": params, "step": jnp.int32(7)}, force=True)
  monkeypatch.setattr(run_lib, "load_tokenizer", lambda config, workdir, path=None: _Tok())
  out = str(tmp_path / "hf")
  export_cli.main([f"--workdir={config.workdir}", f"--out={out}", "--max_shard_size=100KB"])
  assert os.path.exists(os.path.join(out, "tokenizer.model"))
  loaded, meta = hf.load_nextstep(out)
  assert meta == dataclasses.replace(META, gen_pos_grid=hf.GEN_POS_GRID_V1)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(pure_params(loaded))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  ck = str(tmp_path / "imported")
  # The stand-in tokenizer's file is not a model; the import loads the tokenizer it ships and would refuse
  # it, so the directory goes without one (the import warns, the params come across all the same).
  os.remove(os.path.join(out, "tokenizer.model"))
  export_cli.main([f"--import_dir={out}", f"--out={ck}"])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=jax.sharding.SingleDeviceSharding(
                                                             jax.local_devices()[0])), params)
  back = ckpt_lib.restore_params_from(ck, abstract)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert runs.parse_size("5GB") == 5 * 10**9 and runs.parse_size("64KiB") == 65536


# ---------------------------------------------------------------------------------------------
# Non-finite tensors: refused as they are read, naming the file and the tensor
# ---------------------------------------------------------------------------------------------

def _poison(directory, tensor, values=None):
  """Re-saves the shard of `directory` that holds `tensor` with ``safetensors.numpy.save_file``, the
  tensor overwritten: all NaN, or `values` ({flat index: value}). Returns the shard's file name."""
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  index = os.path.join(directory, safetensors_io.INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      shard = json.load(f)["weight_map"][tensor]
  else:
    shard = safetensors_io.SINGLE_FILE
  path = os.path.join(directory, shard)
  tensors = {k: np.array(v) for k, v in safetensors_numpy.load_file(path).items()}
  x = tensors[tensor].reshape(-1)
  if values is None:
    x[:] = np.nan
  else:
    for i, v in values.items():
      x[i] = v
  tensors[tensor] = x.reshape(tensors[tensor].shape)
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
  return shard


def test_nextstep_import_refuses_non_finite_tensors(tmp_path, monkeypatch):
  out = str(tmp_path / "hf")
  index = hf.export_nextstep(_model(), CFG, out, META, max_shard_bytes=200_000)
  hf.load_nextstep(out)  # the clean directory imports

  # An all-NaN tensor: the file, the tensor and the count are named.
  d = str(tmp_path / "nan")
  shutil.copytree(out, d)
  name = "layers.1.mlp.up_proj.weight"
  shard = _poison(d, name)
  pattern = rf"{shard}: tensor layers\.1\.mlp\.up_proj\.weight has {128 * 64} non-finite values \(NaN/Inf\)"
  with pytest.raises(safetensors_io.CheckpointError, match=pattern):
    hf.load_nextstep(d)

  # Checked as each tensor is read: the import stops at the bad tensor, before the rest is read.
  reads = []
  get = safetensors_io.SafetensorsFile.get

  def spy(self, n, **kw):
    reads.append(n)
    return get(self, n, **kw)

  monkeypatch.setattr(safetensors_io.SafetensorsFile, "get", spy)
  cfg, _ = hf.read_nextstep_config(d)
  with pytest.raises(safetensors_io.CheckpointError, match=pattern):
    hf.load_nextstep_params(d, cfg)
  assert reads[-1] == name and len(reads) < len(index["weight_map"]), (len(reads), len(index["weight_map"]))
  monkeypatch.undo()

  # One +Inf and one -Inf in another shard's tensor are enough.
  d = str(tmp_path / "inf")
  shutil.copytree(out, d)
  shard = _poison(d, "lm_head.weight", {3: np.inf, 17: -np.inf})
  with pytest.raises(safetensors_io.CheckpointError,
                     match=rf"{shard}: tensor lm_head\.weight has 2 non-finite values \(NaN/Inf\)"):
    hf.load_nextstep(d)
  # The command line's import refuses it too (no checkpoint is written).
  with pytest.raises(safetensors_io.CheckpointError, match=r"tensor lm_head\.weight has 2 non-finite"):
    runs.import_to_checkpoint(d, str(tmp_path / "ckpt"))
  assert not os.path.exists(tmp_path / "ckpt")


def test_safetensors_reader_checks_every_float_dtype_for_non_finite_values(tmp_path):
  path = str(tmp_path / "t.safetensors")
  bad = np.array([1.0, np.nan, np.inf, -np.inf, 2.0])
  safetensors_io.save_safetensors(path, {
      "f32": bad.astype(np.float32), "bf16": bad.astype(ml_dtypes.bfloat16), "f16": bad.astype(np.float16),
      "ok": np.ones((3, 4), ml_dtypes.bfloat16), "ints": np.arange(6, dtype=np.int32)})
  f = safetensors_io.SafetensorsFile(path)
  for name in ("f32", "bf16", "f16"):
    with pytest.raises(safetensors_io.CheckpointError, match=rf"t\.safetensors: tensor {name} has 3 non-finite"):
      f.get(name)
  np.testing.assert_array_equal(f.get("ok"), np.ones((3, 4), ml_dtypes.bfloat16))
  np.testing.assert_array_equal(f.get("ints"), np.arange(6))
  assert np.isnan(f.get("f32", finite=False)[1])  # an explicit opt-out reads the raw values
  with pytest.raises(safetensors_io.CheckpointError, match=r"tensor (f32|bf16|f16) has 3 non-finite"):
    safetensors_io.load_safetensors(path)
  assert safetensors_io.non_finite_count(np.zeros((0, 4), np.float32)) == 0


def _qwen2_dir_from_export(out, directory):
  """A Qwen2ForCausalLM-style directory (``model.``-prefixed backbone names, model_type qwen2) built
  from our own NextStep export, without transformers."""
  os.makedirs(directory)
  tensors = safetensors_io.TensorDir(out)
  keep = {("" if n == "lm_head.weight" else "model.") + n: np.array(tensors.get(n)) for n in tensors.names()
          if n.startswith(("embed_tokens.", "layers.", "norm.")) or n == "lm_head.weight"}
  safetensors_io.save_safetensors(os.path.join(directory, safetensors_io.SINGLE_FILE), keep)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(dict(model_type="qwen2", vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=False), f)


def test_qwen2_import_refuses_non_finite_tensors(tmp_path):
  out = str(tmp_path / "hf")
  hf.export_nextstep(_model(), CFG, out, META)
  q = str(tmp_path / "qwen")
  _qwen2_dir_from_export(out, q)
  params = hf.import_qwen2_backbone(q)  # the clean directory imports: the export's backbone, bitwise
  want = hf.load_nextstep_params(out, CFG)["backbone"]
  assert jax.tree.structure(params) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  _poison(q, "model.layers.0.self_attn.k_proj.bias", {0: np.nan})
  with pytest.raises(safetensors_io.CheckpointError,
                     match=rf"{safetensors_io.SINGLE_FILE}: tensor model\.layers\.0\.self_attn\.k_proj\.bias has "
                           r"1 non-finite values \(NaN/Inf\)"):
    hf.import_qwen2_backbone(q)


def test_leaf_reader_pieces_own_their_memory():
  """A device shard's piece of a checkpoint tensor is copied out (a numpy view would keep the whole tensor alive:
  a stacked reader held every layer's whole tensor until it stacked them); the whole tensor is passed through."""
  from nextstep_jax.interop import names  # pylint: disable=import-outside-toplevel
  x = np.arange(24, dtype=np.float32).reshape(4, 6)
  part = names._piece(x, (slice(0, 2), slice(None)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(part, x[:2])
  assert not np.shares_memory(part, x)
  cols = names._piece(x.T, (slice(None), slice(1, 3)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(cols, x.T[:, 1:3])
  assert not np.shares_memory(cols, x)
  whole = names._piece(x, (slice(None), slice(None)))  # pylint: disable=protected-access
  assert np.shares_memory(whole, x)


def test_lora_run_exports_streamed_with_its_adapters_merged(tmp_path):
  """A LoRA run (state: the frozen base and the adapters) exports piece by piece, each adapted kernel's pieces
  merged with their layers' adapters: the same tensors, bit for bit, as merging the whole restored tree
  (``lora.merge_lora``, which tests/test_lora.py holds to the adapted model) and exporting that."""
  from tests.runs import make_base_run, shrink  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training import lora as lora_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  work = str(tmp_path / "run")
  with config.unlocked():
    shrink(config)
    config.model.num_layers = 3
    config.workdir = work
    config.vae.checkpoint = os.path.join(work, "vae")
    config.lora.update(dict(rank=2, alpha=4.0, targets=("q", "o", "down"), head_targets=("cond", "mlp_in")))
  _, base = make_base_run(work, config, step=5)
  lcfg = trainer_lib.lora_config(config)
  _, abstract, axes = trainer_lib.abstract_model(config)
  adapters, _ = lora_lib.init_lora(abstract, axes, lcfg, jax.random.key(1))
  rng = np.random.default_rng(2)  # B random too, so every merged kernel differs from its base
  adapters = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), adapters)
  shutil.rmtree(os.path.join(work, "checkpoints"))
  with ckpt_lib.Checkpointer(os.path.join(work, "checkpoints"), every=1, keep=1, async_save=False,
                             config=config) as ckpt:
    ckpt.save(5, {"step": jnp.int32(5), "params": adapters, "base": base}, force=True)

  for dtype in ("float32", "bfloat16"):
    got = str(tmp_path / f"streamed_{dtype}")
    runs.export_workdir(work, got, dtype=dtype)
    cast = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.dtype(dtype))), base)
    merged = lora_lib.merge_lora(cast, adapters, lcfg)
    want = str(tmp_path / f"whole_{dtype}")
    hf.export_nextstep(merged, ns.NextStepConfig.from_config(config), want, hf.ImageMeta.from_config(config),
                       dtype=dtype)
    a, b = safetensors_io.TensorDir(got), safetensors_io.TensorDir(want)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
      x, y = a.get(name), b.get(name)
      assert x.dtype == y.dtype, name
      np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=f"{dtype} {name}")
    # run.load_params (what sample and evaluate read) merges the same way: fp32 adapters, one rounding.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, jnp.dtype(dtype), sharding=one), abstract)
    _, loaded = run_lib.load_params(os.path.join(work, "checkpoints"), config, target=target)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)),
                 loaded, merged)
    plain = safetensors_io.TensorDir(str(tmp_path / f"streamed_{dtype}"))
    q = plain.get("layers.1.self_attn.q_proj.weight").astype(np.float32)
    w = np.asarray(base["backbone"]["layers"]["q_kernel"][1], np.float32)  # (D, H, hd)
    q_base = w.reshape(q.shape[1], -1).T
    assert np.abs(q - q_base).max() > 1e-2  # the adapters are in the export
    if dtype == "float32":  # LoRA's formula written out: W + (alpha / rank) A @ B, as q_proj's [out, in]
      ab = adapters["backbone"]["layers"]["q_kernel"]
      formula = w + 4.0 / 2 * np.einsum("dr,rhk->dhk", ab["lora_a"][1], ab["lora_b"][1])
      assert_close_fp32(q, formula.reshape(q.shape[1], -1).T, rtol=1e-6)


def test_export_of_a_training_run_with_its_chunk_cache_capped(tmp_path, monkeypatch, caplog):
  """A training run's chunks span its layers (orbax's default chunking): the export caches them decoded, but
  never more than its budget; with a cache of nothing it re-reads chunks and writes the same tensors."""
  import logging  # pylint: disable=import-outside-toplevel
  from nextstep_jax.interop import names, stored  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from tests.runs import make_tiny_run  # pylint: disable=import-outside-toplevel
  work = str(tmp_path / "run")
  make_tiny_run(work, step=3)
  monkeypatch.setattr(names, "CHUNK_BYTES", 512)  # the tiny model's whole-leaf chunks count as large
  full = str(tmp_path / "full")
  runs.export_workdir(work, full)
  _, abstract, _ = trainer_lib.abstract_model(run_lib.saved_config(work))
  _, opened = stored.open_params(os.path.join(work, "checkpoints"), abstract, "params", "float32")
  assert opened.cache_bytes > 0
  _, capped_open = stored.open_params(os.path.join(work, "checkpoints"), abstract, "params", "float32",
                                      max_cache_bytes=0)
  assert capped_open.cache_bytes == 0
  capped = str(tmp_path / "capped")
  with caplog.at_level(logging.WARNING):
    runs.export_workdir(work, capped, max_cache_bytes=0)
  assert "chunks are re-read" in caplog.text
  a, b = safetensors_io.TensorDir(full), safetensors_io.TensorDir(capped)
  assert sorted(a.names()) == sorted(b.names())
  for name in a.names():
    np.testing.assert_array_equal(a.get(name).view(np.uint32), b.get(name).view(np.uint32), err_msg=name)
  assert 0 < stored.cache_budget() < 2 ** 50
