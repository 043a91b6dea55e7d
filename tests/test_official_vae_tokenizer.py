"""The NextStep-1 release's VAE and tokenizer directories, read as they are laid out.

The fixtures are built here from the documented names: a small FLUX-layout VAE saved as the
release's ``vae/checkpoint.pt`` (a torch pickle of a plain FLUX-named state dict) beside a
``vae/config.json`` with the release's fields (``"psz": null``, ``"encoder_norm": true``), and a
tiny Hugging Face tokenizer saved as the release's ``tokenizer/`` directory (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``).

The release's encode: moments = encoder(x); mean, logvar = chunk(moments, 2, channels); with psz
set, the mean is patchified by psz (channel-major (c, pi, pj)) before a layer norm over the channel
dim (no affine, eps 1e-6) and unpatchified after; with psz null the norm is over each latent
pixel's channels. The 2x2 token patch (64-d tokens) is the NextStep model's latent_patch_size.
"""

from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax import vae_tokens
from nextstep_jax.data import tokenizer as T
from nextstep_jax.interop import vae as interop
from nextstep_jax.interop.safetensors_io import CheckpointError, load_safetensors
from nextstep_jax.models import vae as vae_lib
from nextstep_jax.models.vae import VAEConfig
from tests.official import EOS, official_vae_config, write_official_vae, write_release_tokenizer
from tests.tolerance import assert_close_fp32

torch = pytest.importorskip("torch")

# FLUX's 32 GroupNorm groups (the release's config.json does not name them), 16 latent channels:
# p=2 tokens are 64-d, as in NextStep-1. f2 (two levels) keeps it small.
SMALL = VAEConfig(base_channels=32, channel_mults=(1, 1), num_res_blocks=1, latent_channels=16,
                  norm_groups=32)


@pytest.fixture(scope="module")
def source_vae():
  return vae_lib.build_vae(SMALL, seed=3)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


@pytest.fixture()
def official_dir(source_vae, tmp_path):
  """``vae/checkpoint.pt`` (torch.save of FLUX-named torch tensors) + ``vae/config.json``."""
  d = tmp_path / "vae"
  write_official_vae(str(d), source_vae, resolution=16)
  return d


def official_encode_mean(moments_nchw: np.ndarray, psz: int | None, eps: float = 1e-6) -> np.ndarray:
  """numpy transcription of the release's encode of the mean (NCHW, float64)."""
  x = np.asarray(moments_nchw, np.float64)
  c2 = x.shape[1]
  mean = x[:, :c2 // 2]
  b, c, h, w = mean.shape
  if psz is not None:  # (B, C, H, W) -> (B, C*p*p, H/p, W/p), channel-major (c, pi, pj)
    p = psz
    mean = mean.reshape(b, c, h // p, p, w // p, p).transpose(0, 1, 3, 5, 2, 4)
    mean = mean.reshape(b, c * p * p, h // p, w // p)
  mu = mean.mean(axis=1, keepdims=True)
  var = ((mean - mu) ** 2).mean(axis=1, keepdims=True)
  mean = (mean - mu) / np.sqrt(var + eps)
  if psz is not None:
    p = psz
    mean = mean.reshape(b, c, p, p, h // p, w // p).transpose(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
  return mean


def _moments_nchw(vae, x) -> np.ndarray:
  mean, logvar = vae.encode_raw_moments(jnp.asarray(x))
  return np.concatenate([np.asarray(mean), np.asarray(logvar)], axis=-1).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# (i) the release's VAE directory loads with 64-d tokens


def test_official_vae_dir_gives_64d_tokens(official_dir, source_vae, images):
  vae = interop.load_vae_dir(str(official_dir), patch_size=2)
  cfg = vae.config
  assert (cfg.patch_size, cfg.norm_patch, cfg.token_dim) == (2, 1, 64)
  assert cfg.token_norm and cfg.deterministic and cfg.norm_groups == 32
  # the patch is the default when the caller does not name it (the release's config cannot)
  assert interop.load_vae_dir(str(official_dir)).config == cfg
  tok = np.asarray(vae_tokens.encode_tokens(vae, jnp.asarray(images)))
  assert tok.shape == (2, 4 * 4, 64)
  out = np.asarray(vae_tokens.decode_tokens(vae, jnp.asarray(tok), 4, 4))
  assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()
  # the weights came through unchanged
  want = interop.vae_to_flux_state_dict(source_vae)
  got = interop.vae_to_flux_state_dict(vae)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_psz_is_the_norm_patch_not_the_token_patch():
  f = interop.config_fields_from_json(official_vae_config(SMALL, psz=None, resolution=16))
  assert f["norm_patch_size"] == 1 and f["patch_size"] == 2
  f = interop.config_fields_from_json({**official_vae_config(SMALL, psz=2, resolution=16), "latent_patch_size": 4})
  assert f["norm_patch_size"] == 2 and f["patch_size"] == 4
  # an older export of this project (norm_groups, no latent_patch_size): psz was the token patch too
  assert interop.config_fields_from_json({"psz": 1, "norm_groups": 4})["patch_size"] == 1
  with pytest.raises(ValueError, match="psz must be null or a positive integer"):
    interop.config_fields_from_json({"psz": 0})
  with pytest.raises(ValueError, match="vae.norm_patch_size must be an integer >= 0"):
    VAEConfig(norm_patch_size=-1)
  # old saved dicts (no norm_patch_size) keep the whole-token norm
  old = {k: v for k, v in SMALL.to_dict().items() if k != "norm_patch_size"}
  assert VAEConfig.from_dict(old) == SMALL and SMALL.norm_patch == SMALL.patch_size


def test_bad_config_json_names_the_file(official_dir):
  (official_dir / "config.json").write_text(json.dumps({**official_vae_config(SMALL, resolution=16), "psz": "two"}))
  with pytest.raises(ValueError, match=r"config\.json: not a valid VAE config\.json.*psz"):
    interop.load_vae_dir(str(official_dir))


# ------------------------------------------------------------------------------------------------
# (ii) the encode equals the release's formula


def test_encode_matches_official_formula_psz_null(official_dir, images):
  vae = interop.load_vae_dir(str(official_dir), patch_size=2)
  moments = _moments_nchw(vae, images)
  want = official_encode_mean(moments, psz=None).transpose(0, 2, 3, 1)
  mean, logvar = vae.encode_moments(jnp.asarray(images))
  assert_close_fp32(mean, want, rtol=1e-5)
  assert_close_fp32(vae.encode(jnp.asarray(images)), want, rtol=1e-5)  # deterministic: the mean
  np.testing.assert_array_equal(np.asarray(logvar), moments[:, 16:].transpose(0, 2, 3, 1))
  # ... and not the 64-d token norm (what psz=2 computes): the two norms really differ here
  whole_token = official_encode_mean(moments, psz=2).transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(mean, np.float64) - whole_token).max() > 1e-2
  pixels = np.asarray(mean, np.float64)  # each latent pixel has zero mean over its channels ...
  np.testing.assert_allclose(pixels.mean(-1), 0.0, atol=1e-5)
  assert np.abs(whole_token.mean(-1)).max() > 1e-2  # ... which the 64-d token norm does not give


def test_our_export_is_read_by_the_official_formula(source_vae, images, tmp_path):
  """Our export writes psz = the norm patch, so the release's code computes our norm; and it
  re-imports as the same config."""
  interop.export_vae(source_vae, str(tmp_path / "ours"))
  cfg_json = json.loads((tmp_path / "ours" / "config.json").read_text())
  assert cfg_json["psz"] == 2 and cfg_json["latent_patch_size"] == 2
  back = interop.load_vae_dir(str(tmp_path / "ours"))
  assert back.config == SMALL
  want = official_encode_mean(_moments_nchw(source_vae, images), psz=cfg_json["psz"])
  assert_close_fp32(source_vae.encode_moments(jnp.asarray(images))[0], want.transpose(0, 2, 3, 1), rtol=1e-5)
  # a per-pixel-norm VAE exports psz 1, and round-trips too
  per_pixel = interop.load_vae_dir(str(tmp_path / "ours"), norm_patch_size=1)
  interop.export_vae(per_pixel, str(tmp_path / "pp"))
  assert json.loads((tmp_path / "pp" / "config.json").read_text())["psz"] == 1
  assert interop.load_vae_dir(str(tmp_path / "pp")).config == per_pixel.config


def test_image_multiple_follows_the_norm_patch(official_dir):
  vae = interop.load_vae_dir(str(official_dir), patch_size=2)
  # 18 = 9 latent pixels: fine for a per-pixel norm, though not whole tokens
  assert vae.encode(jnp.zeros((1, 18, 18, 3))).shape == (1, 9, 9, 16)
  with pytest.raises(ValueError, match="not divisible by 4 .*patch size 2"):
    vae_tokens.encode_tokens(vae, jnp.zeros((1, 18, 18, 3)))
  whole = vae_lib.build_vae(VAEConfig(**{**SMALL.to_dict(), "patch_size": 1, "norm_patch_size": 2}))
  with pytest.raises(ValueError, match="18x18 is not divisible by 4.*encoder-norm patch size 2"):
    whole.encode(jnp.zeros((1, 18, 18, 3)))


# ------------------------------------------------------------------------------------------------
# (iii) checkpoint.pt -> checkpoint.safetensors


def test_convert_checkpoint_is_bitwise(official_dir, images, tmp_path):
  src = official_dir / "checkpoint.pt"
  out = tmp_path / "converted"
  path = interop.convert_checkpoint(str(src), str(out))
  assert path == str(out / "checkpoint.safetensors") and os.path.isfile(path)
  assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "config.json"]  # no temp files left
  assert json.loads((out / "config.json").read_text()) == official_vae_config(SMALL, resolution=16)
  pickled = torch.load(str(src), map_location="cpu", weights_only=True)
  written = load_safetensors(path)
  assert sorted(written) == sorted(pickled)
  for k, v in pickled.items():
    assert written[k].dtype == np.float32 and written[k].shape == tuple(v.shape)
    assert written[k].tobytes() == v.numpy().tobytes(), k
  a = interop.load_vae_dir(str(official_dir), patch_size=2)
  b = interop.load_vae_dir(str(out), patch_size=2)
  assert a.config == b.config
  x = jnp.asarray(images)
  np.testing.assert_array_equal(np.asarray(a.encode(x)), np.asarray(b.encode(x)))


def test_convert_wrapped_bfloat16_and_non_finite(source_vae, tmp_path):
  sd = {k: torch.from_numpy(np.array(v)).to(torch.bfloat16)
        for k, v in interop.vae_to_flux_state_dict(source_vae).items()}
  torch.save({"state_dict": sd}, str(tmp_path / "wrapped.pt"))
  path = interop.convert_checkpoint(str(tmp_path / "wrapped.pt"), str(tmp_path / "out"))
  written = load_safetensors(path)
  for k, v in sd.items():
    assert str(written[k].dtype) == "bfloat16"
    assert written[k].tobytes() == v.view(torch.int16).numpy().tobytes(), k
  assert not os.path.exists(tmp_path / "out" / "config.json")  # none beside the source
  bad = dict(sd)
  bad["decoder.conv_in.bias"] = bad["decoder.conv_in.bias"].clone()
  bad["decoder.conv_in.bias"][0] = float("nan")
  torch.save(bad, str(tmp_path / "bad.pt"))
  with pytest.raises(CheckpointError, match=r"bad\.pt: tensor decoder\.conv_in\.bias has 1 non-finite"):
    interop.convert_checkpoint(str(tmp_path / "bad.pt"), str(tmp_path / "bad_out"))
  assert not os.path.exists(tmp_path / "bad_out" / "checkpoint.safetensors")


def test_without_torch_the_error_names_the_install(official_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  install = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
  with pytest.raises(CheckpointError, match="nothing is unpickled without it") as e:
    interop.convert_checkpoint(str(official_dir / "checkpoint.pt"), str(tmp_path / "out"))
  assert install in str(e.value) and "checkpoint.pt" in str(e.value)
  assert isinstance(e.value, ValueError)
  assert not os.path.exists(tmp_path / "out" / "checkpoint.safetensors")
  with pytest.raises(CheckpointError) as e:
    interop.load_vae_dir(str(official_dir), patch_size=2)
  assert install in str(e.value)


# ------------------------------------------------------------------------------------------------
# (iv) the release's tokenizer directory


def test_release_tokenizer_directory(tmp_path):
  model_dir = tmp_path / "nextstep"
  d, hf = write_release_tokenizer(model_dir)
  (model_dir / "config.json").write_text("{}")
  assert T.find_tokenizer(str(model_dir)) == d
  tok = T.load_tokenizer(T.find_tokenizer(str(model_dir)), "hf")
  assert tok.eos_token == EOS and tok.eos_id == hf.token_to_id(EOS)
  assert tok.eos_id != hf.token_to_id(T.DEMO_EOS)  # the fallback guess would have been this
  for name in T.SPECIAL_TOKENS:
    assert tok.special[name] == hf.token_to_id(name), name
  assert tok.pad_id == hf.token_to_id("[PAD]") and tok.boi_id == hf.token_to_id("<|begin_of_image|>")
  assert (tok.area_id, tok.eoi_id, tok.placeholder_id) == tuple(
      hf.token_to_id(n) for n in ("<|image_area|>", "<|end_of_image|>", "<|image_placeholder|>"))
  assert tok.declared_pad_token == "[PAD]" and tok.declared_pad_id == tok.pad_id
  assert tok.encode("<|begin_of_image|>") == [tok.boi_id]


def test_find_tokenizer_places(tmp_path):
  _, hf = write_release_tokenizer(tmp_path / "a")
  flat = tmp_path / "flat"
  flat.mkdir()
  hf.save(str(flat / "tokenizer.json"))
  assert T.find_tokenizer(str(flat)) == str(flat)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as e:
    T.find_tokenizer(str(empty))
  assert str(empty / "tokenizer") in str(e.value) and f"and in {empty}" in str(e.value)


def test_eos_sources_in_order(tmp_path):
  d, hf = write_release_tokenizer(tmp_path / "m")
  cfg = os.path.join(d, "tokenizer_config.json")
  smap = os.path.join(d, "special_tokens_map.json")
  with open(smap, "w") as f:  # the map disagrees (string form): tokenizer_config.json wins
    json.dump({"eos_token": "<|end_of_thinking|>"}, f)
  assert T.load_tokenizer(d).eos_token == EOS
  os.remove(cfg)
  assert T.load_tokenizer(d).eos_token == "<|end_of_thinking|>"
  os.remove(smap)
  assert T.load_tokenizer(d).eos_token == T.DEMO_EOS  # the documented guess, with neither file


def test_declared_pad_differs_from_pad(tmp_path):
  d, hf = write_release_tokenizer(tmp_path / "m", pad="<|endoftext|>")
  tok = T.load_tokenizer(d)
  assert tok.pad_id == hf.token_to_id("[PAD]")  # packing pads with [PAD] (SPEC §1)
  assert tok.declared_pad_token == "<|endoftext|>" and tok.declared_pad_id == hf.token_to_id("<|endoftext|>")
  tok.save(str(tmp_path / "saved"))
  assert T.load_tokenizer(str(tmp_path / "saved")).declared_pad_token == "<|endoftext|>"


def test_bad_side_files_name_the_file(tmp_path):
  d, hf = write_release_tokenizer(tmp_path / "m")
  cfg = os.path.join(d, "tokenizer_config.json")
  good = open(cfg).read()
  with open(cfg, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: unreadable tokenizer_config\.json"):
    T.load_tokenizer(d)
  with open(cfg, "w") as f:
    f.write("[1, 2]")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: expected a JSON object"):
    T.load_tokenizer(d)
  bad = json.loads(good)
  bad["eos_token"] = {"content": "<|nowhere|>"}
  with open(cfg, "w") as f:
    json.dump(bad, f)
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<\|nowhere\|>' is not in the vocabulary"):
    T.load_tokenizer(d)
  bad = json.loads(good)
  bad["eos_token"] = 7
  with open(cfg, "w") as f:
    json.dump(bad, f)
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token must be a string"):
    T.load_tokenizer(d)
  bad = json.loads(good)
  pad_id = hf.token_to_id("[PAD]")
  bad["added_tokens_decoder"][str(pad_id + 100)] = bad["added_tokens_decoder"].pop(str(pad_id))
  with open(cfg, "w") as f:
    json.dump(bad, f)
  with pytest.raises(ValueError, match=rf"tokenizer_config\.json: added_tokens_decoder gives '\[PAD\]' "
                                       rf"id {pad_id + 100}.*at id {pad_id}"):
    T.load_tokenizer(d)
