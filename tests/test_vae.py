"""VAE model, token helpers, importer/exporter name maps (no torch needed), latent tool, metrics."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextstep_jax import batch as batch_lib
from nextstep_jax import vae_tokens
from nextstep_jax.evaluation import image_metrics
from nextstep_jax.interop import vae as interop
from nextstep_jax.models import vae as vae_lib
from nextstep_jax.models.vae import VAEConfig
from tests.tolerance import assert_close_fp32

# A tiny config of the demo's shape family: f4, 4 latent channels, p=2 -> 16 tokens of 16 dims.
TINY = VAEConfig(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                 norm_groups=4)


@pytest.fixture(scope="module")
def tiny_vae():
  return vae_lib.build_vae(TINY, seed=0)


@pytest.fixture(scope="module")
def digits32():
  """20 digit-like 32x32 RGB images in [-1, 1] (random strokes on black) with labels 0..9."""
  rng = np.random.default_rng(0)
  x = -np.ones((20, 32, 32), np.float32)
  for img in x:
    for _ in range(6):
      r, c = rng.integers(6, 26, 2)
      img[r - 2:r + 2, c - 5:c + 5] = rng.uniform(0.3, 1.0)
  return np.repeat(x[..., None], 3, axis=-1), np.arange(20, dtype=np.int32) % 10


# ------------------------------------------------------------------------------------------------
# Presets and config.


def test_presets_geometry():
  demo = vae_lib.preset("demo")
  assert (demo.factor, demo.latent_channels, demo.patch_size, demo.token_dim) == (4, 4, 2, 16)
  assert demo.pixels_per_token == 8  # 32x32 digit -> 4x4 = 16 tokens
  f = vae_lib.preset("f8d16")
  assert (f.factor, f.latent_channels, f.token_dim, f.base_channels) == (8, 16, 64, 128)
  assert f.channel_mults == (1, 2, 4, 4) and f.num_res_blocks == 2 and f.norm_groups == 32
  assert f.mid_attention and f.token_norm and f.scaling_factor == 1.0 and f.shift_factor == 0.0


def test_f8d16_parameter_count_matches_flux():
  # FLUX.1's autoencoder (ae.safetensors) has 83,819,683 parameters; shapes only, no memory.
  abstract = vae_lib.abstract_vae(vae_lib.preset("f8d16"))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n == 83_819_683


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="norm_groups"):
    VAEConfig(base_channels=12, channel_mults=(1, 2), norm_groups=8)
  with pytest.raises(ValueError, match="channel_mults"):
    VAEConfig(channel_mults=())
  with pytest.raises(ValueError, match="unknown VAE config fields.*bogus"):
    VAEConfig.from_dict({"bogus": 1})
  with pytest.raises(ValueError, match="unknown VAE preset"):
    vae_lib.preset("f16d32")
  assert VAEConfig.from_dict(TINY.to_dict()) == TINY


# ------------------------------------------------------------------------------------------------
# Token helpers.


def test_patchify_channel_order_and_inverse():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)  # (B, H, W, C)
  tok = np.asarray(vae_lib.patchify(jnp.asarray(z), 2))
  assert tok.shape == (2, 3 * 2, 3 * 4)
  # token (i, j) in raster order; inside, index c*p*p + pi*p + pj holds z[2i+pi, 2j+pj, c]
  for i in range(3):
    for j in range(2):
      t = tok[:, i * 2 + j]
      for c in range(3):
        for pi in range(2):
          for pj in range(2):
            np.testing.assert_array_equal(t[:, c * 4 + pi * 2 + pj], z[:, 2 * i + pi, 2 * j + pj, c])
  back = np.asarray(vae_lib.unpatchify(jnp.asarray(tok), 3, 2, 2))
  np.testing.assert_array_equal(back, z)
  # and the other way round
  t2 = rng.normal(size=(1, 12, 20)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(vae_tokens.patchify(vae_tokens.unpatchify(jnp.asarray(t2), 3, 4, 2), 2)), t2)
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    vae_lib.patchify(jnp.zeros((1, 5, 4, 2)), 2)
  with pytest.raises(ValueError, match="token grid"):
    vae_lib.unpatchify(jnp.zeros((1, 5, 8)), 2, 2, 2)


def test_normalize_tokens():
  x = jax.random.normal(jax.random.key(0), (3, 7, 16)) * 5.0 + 2.0
  y = vae_tokens.normalize_tokens(x)
  np.testing.assert_allclose(np.asarray(y.mean(-1)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y.var(-1)), 1.0, atol=1e-4)
  y16 = vae_tokens.normalize_tokens(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16


def test_encoded_tokens_have_zero_mean_unit_variance(tiny_vae, digits32):
  x, _ = digits32
  tok = np.asarray(vae_tokens.encode_tokens(tiny_vae, jnp.asarray(x)))
  assert tok.shape == (20, 16, 16)
  np.testing.assert_allclose(tok.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(tok.var(-1), 1.0, atol=1e-3)
  # the raw encoder mean is not normalised: the norm is doing the work
  raw, _ = tiny_vae.encode_raw_moments(jnp.asarray(x))
  raw_tok = np.asarray(vae_lib.patchify(raw, 2))
  assert np.abs(raw_tok.var(-1) - 1.0).max() > 1e-2
  # a posterior sample adds exp(logvar/2) noise on top of the normalised mean
  sampled = np.asarray(vae_tokens.encode_tokens(tiny_vae, jnp.asarray(x), jax.random.key(1)))
  assert not np.allclose(sampled, tok)


def test_token_functions_jit_and_roundtrip_shapes(tiny_vae, digits32):
  x = jnp.asarray(digits32[0][:4])
  encode, params = vae_tokens.token_encoder(tiny_vae)
  tok_jit = jax.jit(encode)(params, x)
  # jit vs eager fp32: equal up to reassociation, relative to the tokens' magnitude (on AVX-512 / AMX
  # Xeons they differ by 1.2e-5 on values near 1.5, beyond a bare atol=1e-5).
  assert_close_fp32(tok_jit, vae_tokens.encode_tokens(tiny_vae, x), rtol=1e-5)
  decode, params = vae_tokens.token_decoder(tiny_vae)
  img = jax.jit(decode, static_argnums=(2, 3))(params, tok_jit, 4, 4)
  assert img.shape == (4, 32, 32, 3)
  # pixel sizes are accepted too; wrong grids are not
  assert vae_tokens.decode_tokens(tiny_vae, tok_jit, 32, 32).shape == (4, 32, 32, 3)
  with pytest.raises(ValueError, match="do not fill"):
    vae_tokens.decode_tokens(tiny_vae, tok_jit, 3, 5)
  with pytest.raises(ValueError, match=r"tokens must be \(B, T, 16\)"):
    vae_tokens.decode_tokens(tiny_vae, tok_jit[..., :8], 4, 4)
  assert vae_tokens.token_grid(TINY, 64, 32) == (8, 4)


def test_scaling_and_shift_factors_are_inverted_by_decode(digits32):
  cfg = VAEConfig(**{**TINY.to_dict(), "channel_mults": (1, 2, 2), "scaling_factor": 0.5,
                     "shift_factor": 0.25})
  vae = vae_lib.build_vae(cfg, seed=0)
  x = jnp.asarray(digits32[0][:2])
  tok = vae_tokens.encode_tokens(vae, x)
  z = vae.encode(x, sample=False)
  assert_close_fp32(tok, vae_lib.patchify((z - 0.25) * 0.5, 2), rtol=1e-6)
  assert_close_fp32(vae_tokens.decode_tokens(vae, tok, 4, 4), vae.decode(z), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_sizes(tiny_vae):
  with pytest.raises(ValueError, match="30x30 is not divisible by 8"):
    tiny_vae.encode(jnp.zeros((1, 30, 30, 3)))
  # 36 is divisible by the factor 4 but not by factor x patch = 8 (token norm needs whole patches)
  with pytest.raises(ValueError, match="36x36 is not divisible by 8.*patch size 2"):
    tiny_vae.encode(jnp.zeros((1, 36, 36, 3)))
  no_norm = vae_lib.build_vae(VAEConfig(**{**TINY.to_dict(), "token_norm": False}), seed=0)
  assert no_norm.encode(jnp.zeros((1, 36, 36, 3))).shape == (1, 9, 9, 4)
  with pytest.raises(ValueError, match="not divisible by 4"):
    no_norm.encode(jnp.zeros((1, 34, 34, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    tiny_vae.encode(jnp.zeros((32, 32, 3)))
  with pytest.raises(ValueError, match=r"latents must be \(B, h, w, 4\)"):
    tiny_vae.decode(jnp.zeros((1, 8, 8, 3)))


def test_grayscale_and_rgba_are_rejected_with_the_conversion_named(tiny_vae):
  with pytest.raises(ValueError, match="grayscale.*as_rgb"):
    tiny_vae.encode(jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="RGBA.*as_rgb"):
    tiny_vae.encode(jnp.zeros((1, 32, 32, 4)))


def test_as_rgb_conversions():
  rng = np.random.default_rng(0)
  g = rng.uniform(-1, 1, (2, 8, 8)).astype(np.float32)
  rgb = batch_lib.as_rgb(g)
  assert rgb.shape == (2, 8, 8, 3) and np.array_equal(rgb[..., 1], g)
  assert np.array_equal(batch_lib.as_rgb(g[..., None]), rgb)
  rgba = rng.uniform(-1, 1, (2, 8, 8, 4)).astype(np.float32)
  rgba[0, ..., 3] = 1.0   # opaque: colours kept
  rgba[1, ..., 3] = -1.0  # transparent: background
  out = batch_lib.as_rgb(rgba, background=1.0)
  np.testing.assert_allclose(out[0], rgba[0, ..., :3])
  np.testing.assert_allclose(out[1], 1.0)
  assert isinstance(batch_lib.as_rgb(jnp.asarray(g)), jax.Array)
  with pytest.raises(ValueError, match="2 channels"):
    batch_lib.as_rgb(np.zeros((1, 4, 4, 2)))


def test_nan_pixels_rejected(tiny_vae):
  x = np.zeros((3, 32, 32, 3), np.float32)
  x[1, 5, 5, 0] = np.nan
  with pytest.raises(ValueError, match=r"NaN or Inf pixels \(in batch rows \[1\]\)"):
    tiny_vae.encode(jnp.asarray(x))
  with pytest.raises(ValueError, match="NaN"):
    vae_tokens.latent_stats(tiny_vae, x)
  x[1, 5, 5, 0] = np.inf
  with pytest.raises(ValueError, match="NaN or Inf"):
    vae_lib.validate_images(x, TINY)


# ------------------------------------------------------------------------------------------------
# Importer / exporter without torch.


def test_export_then_import_roundtrip(tiny_vae, tmp_path, digits32):
  path = interop.export_vae(tiny_vae, str(tmp_path / "vae"))
  assert os.path.basename(path) == "checkpoint.safetensors"
  cfg_json = json.loads((tmp_path / "vae" / "config.json").read_text())
  assert cfg_json["psz"] == 2 and cfg_json["encoder_norm"] is True and cfg_json["z_channels"] == 4
  sd = interop.load_state_dict(path)
  # FLUX names and PyTorch layouts
  assert sd["encoder.conv_in.weight"].shape == (8, 3, 3, 3)
  assert sd["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
  assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (16, 8, 1, 1)
  assert "encoder.down.1.downsample.conv.weight" in sd and "encoder.down.2.downsample.conv.weight" not in sd
  assert "decoder.up.2.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
  assert "decoder.up.0.block.1.norm1.weight" in sd  # decoder has num_res_blocks + 1 blocks
  loaded = interop.load_vae_dir(str(tmp_path / "vae"))
  assert loaded.config == TINY
  x = jnp.asarray(digits32[0][:2])
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(tiny_vae(x)))


def test_config_inferred_from_weights(tiny_vae):
  sd = interop.vae_to_flux_state_dict(tiny_vae)
  cfg = interop.config_from_state_dict(sd, norm_groups=4)
  assert cfg == TINY
  no_attn = {k: v for k, v in sd.items() if ".attn_1." not in k}
  assert not interop.config_from_state_dict(no_attn, norm_groups=4).mid_attention


def test_prefixed_names_are_stripped(tiny_vae):
  sd = {"first_stage_model." + k: v for k, v in interop.vae_to_flux_state_dict(tiny_vae).items()}
  vae = interop.vae_from_state_dict(sd, norm_groups=4)
  assert vae.config == TINY


def test_state_dict_errors(tiny_vae):
  sd = interop.vae_to_flux_state_dict(tiny_vae)
  missing = dict(sd)
  del missing["decoder.mid.attn_1.k.weight"]
  with pytest.raises(interop.StateDictError, match=r"missing keys \(1\).*decoder\.mid\.attn_1\.k\.weight"):
    interop.load_flux_state_dict(vae_lib.build_vae(TINY), missing)
  bad = dict(sd)
  bad["encoder.conv_out.weight"] = np.zeros((8, 16, 1, 1), np.float32)
  with pytest.raises(interop.StateDictError,
                     match=r"misshapen.*encoder\.conv_out\.weight: expected \(8, 16, 3, 3\), got \(8, 16, 1, 1\)"):
    interop.load_flux_state_dict(vae_lib.build_vae(TINY), bad)
  extra = dict(sd, **{"encoder.extra.weight": np.zeros((1,), np.float32)})
  with pytest.raises(interop.StateDictError, match=r"unexpected keys.*encoder\.extra\.weight"):
    interop.load_flux_state_dict(vae_lib.build_vae(TINY), extra)
  with pytest.raises(interop.StateDictError, match="quant convs"):
    interop.diffusers_to_flux({"quant_conv.weight": np.zeros((8, 8, 1, 1)),
                               "encoder.down_blocks.0.resnets.0.norm1.weight": np.zeros(8)})
  with pytest.raises(interop.StateDictError, match="missing 'encoder.conv_in.weight'"):
    interop.config_from_state_dict({"decoder.conv_in.weight": np.zeros((16, 4, 3, 3))})
  # wrong latent size between encoder and decoder
  odd = dict(sd, **{"encoder.conv_out.weight": np.zeros((6, 16, 3, 3), np.float32)})
  with pytest.raises(interop.StateDictError, match="2 x 4 latent channels"):
    interop.config_from_state_dict(odd)


def test_file_formats_refused(tmp_path):
  p = tmp_path / "weights.pkl"
  p.write_bytes(b"not a pickle you should open")
  with pytest.raises(ValueError, match="unsupported checkpoint type"):
    interop.load_state_dict(str(p))
  with pytest.raises(FileNotFoundError):
    interop.load_state_dict(str(tmp_path / "nope.safetensors"))
  with pytest.raises(FileNotFoundError, match="no VAE weights"):
    interop.load_vae_dir(str(tmp_path))


def test_import_refuses_non_finite_tensors(tiny_vae, tmp_path):
  from safetensors.numpy import load_file, save_file
  from nextstep_jax.interop.safetensors_io import CheckpointError
  d = tmp_path / "vae"
  path = interop.export_vae(tiny_vae, str(d))
  sd = {k: np.array(v) for k, v in load_file(path).items()}
  name = "decoder.up.1.block.0.conv1.weight"
  sd[name][:] = np.nan  # all NaN
  save_file(sd, path)
  with pytest.raises(CheckpointError, match=rf"checkpoint\.safetensors: tensor {name} has {sd[name].size} "
                                            r"non-finite values \(NaN/Inf\)"):
    interop.load_vae_dir(str(d))
  sd[name][:] = 0.0
  sd["encoder.conv_in.bias"][2] = -np.inf  # one Inf is enough
  save_file(sd, path)
  with pytest.raises(CheckpointError, match=r"tensor encoder\.conv_in\.bias has 1 non-finite values"):
    interop.load_vae_dir(str(d))
  # A PyTorch state dict (read with weights_only=True) is checked the same way.
  torch = pytest.importorskip("torch")
  pt = tmp_path / "pt"
  pt.mkdir()
  (pt / "config.json").write_text((d / "config.json").read_text())
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(pt / "checkpoint.pt"))
  with pytest.raises(CheckpointError, match=r"checkpoint\.pt: tensor encoder\.conv_in\.bias has 1 non-finite"):
    interop.load_vae_dir(str(pt))


def test_config_json_fields():
  ns = interop.config_fields_from_json({"psz": 2, "encoder_norm": True, "scaling_factor": 1.0,
                                        "shift_factor": 0.0, "deterministic": False,
                                        "ch": 128, "ch_mult": [1, 2, 4, 4], "z_channels": 16})
  assert ns["patch_size"] == 2 and ns["token_norm"] and ns["channel_mults"] == (1, 2, 4, 4)
  diff = interop.config_fields_from_json({"block_out_channels": [32, 64, 64], "layers_per_block": 1,
                                          "norm_num_groups": 8, "latent_channels": 16,
                                          "use_quant_conv": False, "use_post_quant_conv": False})
  assert diff["base_channels"] == 32 and diff["channel_mults"] == (1, 2, 2)
  assert diff["norm_groups"] == 8 and diff["token_norm"] is False
  with pytest.raises(ValueError, match="quant convs"):
    interop.config_fields_from_json({"block_out_channels": [32], "use_quant_conv": True})


# ------------------------------------------------------------------------------------------------
# Latent tool.


def test_latent_stats(tiny_vae, digits32):
  x, _ = digits32
  stats = vae_tokens.latent_stats(tiny_vae, x, batch_size=8)  # 20 = 8 + 8 + 4 (padded batch)
  assert stats["num_images"] == 20 and stats["num_tokens"] == 20 * 16
  assert len(stats["channel_mean"]) == 4 and len(stats["token_std"]) == 16
  assert stats["token_mean_abs_max"] < 1e-5
  assert 0.99 < stats["token_var_range"][0] <= stats["token_var_range"][1] < 1.01
  # against a direct computation
  tok = np.asarray(vae_tokens.encode_tokens(tiny_vae, jnp.asarray(x)), np.float64)
  assert_close_fp32(stats["token_mean"], tok.mean((0, 1)), rtol=1e-5)
  ch = tok.reshape(20, 16, 4, 4)  # (.., c, pi*p+pj)
  assert_close_fp32(stats["channel_std"], ch.transpose(2, 0, 1, 3).reshape(4, -1).std(-1), rtol=1e-5)
  raw = np.asarray(tiny_vae.encode_raw_moments(jnp.asarray(x))[0], np.float64)
  assert_close_fp32(stats["raw_channel_mean"], raw.mean((0, 1, 2)), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Metrics.


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
  """Direct (window by window) SSIM of one single-channel image pair in [0, 1]."""
  g = image_metrics.gaussian_window(11, 1.5).astype(np.float64)
  w = np.outer(g, g)
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  vals = []
  for i in range(a.shape[0] - 10):
    for j in range(a.shape[1] - 10):
      pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
      ma, mb = (w * pa).sum(), (w * pb).sum()
      va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
      cov = (w * (pa - ma) * (pb - mb)).sum()
      vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return float(np.mean(vals))


def test_psnr_and_ssim():
  rng = np.random.default_rng(0)
  a = rng.uniform(0, 1, (2, 16, 16, 1)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(np.asarray(image_metrics.psnr(jnp.asarray(a), jnp.asarray(a + 0.1))),
                             20.0, atol=1e-3)
  s = np.asarray(image_metrics.ssim(jnp.asarray(a), jnp.asarray(b)))
  for k in range(2):
    assert_close_fp32(s[k], _ssim_reference(a[k, ..., 0].astype(np.float64), b[k, ..., 0].astype(np.float64)),
                      rtol=1e-5)
  np.testing.assert_allclose(np.asarray(image_metrics.ssim(jnp.asarray(a), jnp.asarray(a))), 1.0,
                             atol=1e-5)
  worse = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1).astype(np.float32)
  assert (np.asarray(image_metrics.ssim(jnp.asarray(a), jnp.asarray(worse))) < s).all()
  m = image_metrics.reconstruction_metrics(jnp.asarray(a * 2 - 1), jnp.asarray(b * 2 - 1))
  assert_close_fp32(m["ssim"], s, rtol=1e-5)
  with pytest.raises(ValueError, match="different shapes"):
    image_metrics.psnr(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 5, 1)))
  with pytest.raises(ValueError, match="at least 11x11"):
    image_metrics.ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))
