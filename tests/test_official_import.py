"""Official NextStep-1 and NextStep-1.1 directories, as the release lays them out, in and out.

The fixture is built here from the documented layout (SPEC §9, the release's ``NextStepConfig`` and
``AutoEncoderParams`` fields), not from the project's writers: every tensor name and shape written out
(``tests.test_export.expected_shapes``) plus ``gen_pos_embed`` (transcribed below from the release's
``get_2d_sincos_pos_embed``), bf16 safetensors in two shards written with torch, a config.json of each
version, ``tokenizer/`` in the Hugging Face layout, and ``vae/`` with ``config.json`` (``"psz": null``) and a
``checkpoint.pt`` written with ``torch.save``. It imports with README's command and nothing else.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from nextstep_jax import export as export_cli
from nextstep_jax import run as run_lib
from nextstep_jax.data import tokenizer as tok_lib
from nextstep_jax.interop import safetensors_io
from nextstep_jax.interop import vae as vae_interop
from nextstep_jax.models import vae as vae_lib
from nextstep_jax.sampling import runner
from tests.official import EOS, write_official_vae, write_release_tokenizer
from tests.test_export import expected_shapes

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

HIDDEN, HEADS, KV, HD, MLP, LAYERS, HEAD_DIM, HEAD_LAYERS = 64, 4, 2, 16, 128, 2, 64, 2
CHANNELS, PATCH = 16, 2
TOKEN_DIM = CHANNELS * PATCH * PATCH


# --- transcription of get_2d_sincos_pos_embed (v1 release, nextstep/models/modeling_nextstep.py) ---------

def official_1d_sincos(embed_dim, pos):
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.0
  omega = 1.0 / 10000**omega
  pos = pos.reshape(-1)
  out = np.einsum("m,d->md", pos, omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def official_2d_sincos(embed_dim, grid_size):
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # w goes first
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  emb_h = official_1d_sincos(embed_dim // 2, grid[0])
  emb_w = official_1d_sincos(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


# --- the fixture ------------------------------------------------------------------------------------------

def _vae_dir(path):
  """vae/: the release's config.json fields with psz null, and checkpoint.pt written by torch.save."""
  cfg = vae_lib.VAEConfig(base_channels=32, channel_mults=(1, 1, 1, 1), num_res_blocks=1,
                          latent_channels=CHANNELS, norm_groups=32)
  model = vae_lib.AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), 512))
  nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), state))
  return write_official_vae(path, model)


def official_dir(root, version: str):
  """A NextStep-1 ("1.0") or NextStep-1.1 ("1.1") directory. Returns (path, tensors as torch)."""
  d = str(root / f"nextstep-{version}")
  os.makedirs(d)
  _, tok = write_release_tokenizer(d)
  vocab = tok.get_vocab_size(with_added_tokens=True)
  ids = {t: tok.token_to_id(t) for t in (EOS, "[PAD]", "<|begin_of_image|>", "<|end_of_image|>",
                                          "<|image_placeholder|>")}
  _vae_dir(os.path.join(d, "vae"))
  shapes = expected_shapes(HIDDEN, HEADS, KV, HD, MLP, vocab, LAYERS, HEAD_DIM, HEAD_LAYERS, TOKEN_DIM)
  gen = torch.Generator().manual_seed(0)
  tensors = {k: (torch.randn(s, generator=gen) * 0.05 + (1.0 if "norm" in k or "_ln" in k else 0.0)
                 ).to(torch.bfloat16) for k, s in shapes.items()}
  config = {"architectures": ["NextStep"], "model_type": "nextstep", "vocab_size": vocab, "hidden_size": HIDDEN,
            "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "head_dim": HD, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": True,
            "o_attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
            "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
            "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": ids[EOS],
            "pad_token_id": ids["[PAD]"], "vae_name_or_path": "vae", "latent_patch_size": PATCH,
            "latent_channels": CHANNELS, "boi": ids["<|begin_of_image|>"], "eoi": ids["<|end_of_image|>"],
            "image_placeholder_id": ids["<|image_placeholder|>"], "pad_token_id_added": ids["[PAD]"],
            "lm_loss_weight": 0.01, "im_loss_weight": 1.0, "fm_head_dim": HEAD_DIM, "fm_head_layers": HEAD_LAYERS,
            "fm_head_batch_mul": 4, "use_gen_pos_embed": False, "transformers_version": "4.48.0"}
  if version == "1.0":  # the v1 model always registers its 32 x 32 table as a persistent buffer
    config["latent_size"] = 32
    tensors["gen_pos_embed"] = torch.from_numpy(official_2d_sincos(HIDDEN, 32)).float().unsqueeze(0).to(
        torch.bfloat16)
  else:  # 1.1: 512 px (64 x 64 latents); the table only exists with use_gen_pos_embed
    config.update(latent_size=64, base_image_grid_size=64)
  names = sorted(tensors)
  half = len(names) // 2
  shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
  for file, keys in shards.items():
    safetensors_torch.save_file({k: tensors[k] for k in keys}, os.path.join(d, file), metadata={"format": "pt"})
  index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
           "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)
  return d, tensors, config


def _bits(t):
  return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_official_directory_imports_samples_and_exports_back_bitwise(tmp_path, version):
  src, tensors, config = official_dir(tmp_path, version)
  work, back = str(tmp_path / "run"), str(tmp_path / "back")
  export_cli.main([f"--import_dir={src}", f"--out={work}"])  # README's command, nothing else

  # The run: config sized by config.json, the tokenizer and the VAE found where the release puts them.
  run = run_lib.load_run(work)
  c = run.config
  assert (c.model.hidden_size, c.model.num_layers, c.head.dim, c.image.patch_size) == (HIDDEN, LAYERS, HEAD_DIM, 2)
  assert c.data.image_size == config["latent_size"] * 8 and c.image.token_norm is False
  assert run.tokenizer.eos_id == config["eos_token_id"] and run.tokenizer.boi_id == config["boi"]
  assert run.vae.config.token_dim == TOKEN_DIM and run.vae.config.patch_size == PATCH
  stats = runner.sample_run(work, "a photo of a cat", num=1, steps=2, size=64, out=str(tmp_path / "png"))
  assert stats["images"] == 1 and os.path.isfile(os.path.join(tmp_path, "png", "sample_000.png"))

  # And back in the official layout: every tensor, gen_pos_embed included, bit for bit.
  export_cli.main([f"--workdir={work}", f"--out={back}", "--dtype=bfloat16"])
  out = safetensors_io.TensorDir(back)
  assert sorted(out.names()) == sorted(tensors)
  for name, t in tensors.items():
    np.testing.assert_array_equal(out.get(name).view(np.int16), _bits(t), err_msg=name)
  with open(os.path.join(back, "config.json")) as f:
    written = json.load(f)
  for key, value in config.items():
    assert written[key] == value, key
  # The VAE as the release's loader reads it: config.json + checkpoint.pt (a plain state dict).
  want = torch.load(os.path.join(src, "vae", "checkpoint.pt"), weights_only=True)
  got = torch.load(os.path.join(back, "vae", "checkpoint.pt"), weights_only=True)
  assert sorted(got) == sorted(want)
  for k in want:
    assert torch.equal(got[k], want[k]), k
  with open(os.path.join(src, "vae", "config.json")) as f, open(os.path.join(back, "vae", "config.json")) as g:
    want_cfg, got_cfg = json.load(f), json.load(g)
  assert {k: got_cfg.get(k) for k in want_cfg} == want_cfg
  # The tokenizer ships too.
  assert tok_lib.load_tokenizer(tok_lib.find_tokenizer(back)).eos_id == config["eos_token_id"]


def test_gen_pos_embed_is_the_releases_table():
  from nextstep_jax.interop import hf
  for hidden, grid in ((64, 32), (128, 5)):
    np.testing.assert_array_equal(hf.gen_pos_table(hidden, grid)[0], official_2d_sincos(hidden, grid).astype(np.float32))


def _edit(directory, config=None, tensors=None, drop=None):
  """Changes an official directory in place: config.json fields, tensors put (a new one goes into the first
  shard) and tensors dropped (names matching the regular expression `drop`), shards and index rewritten."""
  import re  # pylint: disable=import-outside-toplevel
  if config:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
      c = json.load(f)
    c.update(config)
    with open(path, "w") as f:
      json.dump(c, f)
  if not tensors and not drop:
    return
  index_path = os.path.join(directory, "model.safetensors.index.json")
  with open(index_path) as f:
    index = json.load(f)
  for name in tensors or {}:
    index["weight_map"].setdefault(name, "model-00001-of-00002.safetensors")
  gone = lambda name: drop is not None and re.fullmatch(drop, name)
  for shard in sorted(set(index["weight_map"].values())):
    file = os.path.join(directory, shard)
    data = {k: v for k, v in safetensors_torch.load_file(file).items() if not gone(k)}
    data.update({k: v for k, v in (tensors or {}).items() if index["weight_map"][k] == shard})
    safetensors_torch.save_file(data, file, metadata={"format": "pt"})
  index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not gone(k)}
  with open(index_path, "w") as f:
    json.dump(index, f)


def test_official_directory_mistakes_are_named(tmp_path):
  src, tensors, _ = official_dir(tmp_path, "1.0")
  table = tensors["gen_pos_embed"].clone()
  table[0, 5, 3] += 0.5
  _edit(src, tensors={"gen_pos_embed": table})
  with pytest.raises(safetensors_io.CheckpointError, match="gen_pos_embed is not the 2-D sin-cos table"):
    export_cli.main([f"--import_dir={src}", f"--out={tmp_path / 'a'}"])
  _edit(src, tensors={"gen_pos_embed": tensors["gen_pos_embed"]}, config={"use_gen_pos_embed": True})
  with pytest.raises(safetensors_io.CheckpointError, match="use_gen_pos_embed=true"):
    export_cli.main([f"--import_dir={src}", f"--out={tmp_path / 'b'}"])
  _edit(src, config={"use_gen_pos_embed": False},
        tensors={"layers.0.self_attn.o_proj.bias": torch.zeros(HIDDEN, dtype=torch.bfloat16)})
  with pytest.raises(safetensors_io.CheckpointError, match="o_proj.bias: a bias on o_proj"):
    export_cli.main([f"--import_dir={src}", f"--out={tmp_path / 'c'}"])
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_official_vae_pickle_converts_without_unpickling_code(tmp_path):
  d = str(tmp_path / "vae")
  sd = _vae_dir(d)
  path = vae_interop.convert_checkpoint(os.path.join(d, "checkpoint.pt"), str(tmp_path / "converted"))
  got = safetensors_io.load_safetensors(path)
  assert sorted(got) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])
  export_cli.main([f"--convert_vae={os.path.join(d, 'checkpoint.pt')}", f"--out={tmp_path / 'cli'}"])
  assert os.path.isfile(tmp_path / "cli" / vae_interop.CHECKPOINT_FILE)


def test_attention_bias_as_the_release_config_says(tmp_path):
  from nextstep_jax.interop import hf  # pylint: disable=import-outside-toplevel
  src, _, _ = official_dir(tmp_path, "1.1")
  bias = r"layers\.\d+\.self_attn\.[qkv]_proj\.bias"
  _edit(src, drop=bias)
  # attention_bias: true with the bias tensors gone: the missing tensor is named.
  with pytest.raises(safetensors_io.CheckpointError, match=r"layers\.0\.self_attn\.q_proj\.bias is missing"):
    hf.load_nextstep(src)
  # The LlamaConfig default (absent, or false): no q/k/v biases in the release's model, zeros here.
  _edit(src, config={"attention_bias": False})
  model, meta = hf.load_nextstep(src)
  assert meta.qkv_bias is False
  assert not np.any(np.asarray(model.backbone.layers.q_bias[...])) and not np.any(np.asarray(model.backbone.layers.v_bias[...]))
