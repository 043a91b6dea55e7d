"""Parity with diffusers' AutoencoderKL (FLUX layout) and the safe PyTorch import paths.

Skipped when torch or diffusers is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from nextstep_jax.interop import vae as interop  # noqa: E402
from tests.tolerance import assert_close_fp32  # noqa: E402

# 3e-5 of the values' magnitude (max |reference|, 3.0 to 3.7 here): the former bare atol=1e-4, relative.
RTOL = 3e-5


def _diffusers_vae(seed: int = 0, mid_attention: bool = True):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
      layers_per_block=1, latent_channels=16, norm_num_groups=8, use_quant_conv=False,
      use_post_quant_conv=False, mid_block_add_attention=mid_attention).eval()
  with torch.no_grad():  # perturb every parameter (norm weights start at exactly 1 / 0)
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def reference():
  model = _diffusers_vae()
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)  # NHWC
  z = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
  with torch.no_grad():
    post = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    mean = post.mean.permute(0, 2, 3, 1).numpy()
    logvar = post.logvar.permute(0, 2, 3, 1).numpy()
    dec = model.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  return model, x, z, mean, logvar, dec


def _check(vae, ref):
  _, x, z, mean, logvar, dec = ref
  m, lv = vae.encode_raw_moments(jnp.asarray(x))
  for name, got, want in (("mean", m, mean), ("logvar", lv, logvar), ("decode", vae.decode(jnp.asarray(z)), dec)):
    assert_close_fp32(got, want, rtol=RTOL, err_msg=name)


def test_diffusers_state_dict_parity(reference):
  model = reference[0]
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  vae = interop.vae_from_state_dict(sd, norm_groups=8, token_norm=False)
  assert vae.config.base_channels == 32 and vae.config.channel_mults == (1, 2, 2)
  assert vae.config.latent_channels == 16 and vae.config.num_res_blocks == 1
  _check(vae, reference)


def test_diffusers_directory_parity(reference, tmp_path):
  # save_pretrained: config.json + diffusion_pytorch_model.safetensors
  reference[0].save_pretrained(str(tmp_path), safe_serialization=True)
  vae = interop.load_vae_dir(str(tmp_path))
  assert vae.config.norm_groups == 8 and not vae.config.token_norm
  _check(vae, reference)


def test_flux_named_torch_checkpoint_parity(reference, tmp_path):
  """A FLUX/NextStep-named ``checkpoint.pt`` (made from the diffusers weights by our name map,
  attention as 1x1 convs) read with torch.load(weights_only=True)."""
  model = reference[0]
  flux = interop.diffusers_to_flux({k: v.numpy() for k, v in model.state_dict().items()})
  assert flux["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
  assert "decoder.up.0.block.1.conv1.weight" in flux and "encoder.down.0.downsample.conv.weight" in flux
  torch.save({k: torch.from_numpy(v) for k, v in flux.items()}, tmp_path / "checkpoint.pt")
  vae = interop.load_vae_file(str(tmp_path / "checkpoint.pt"), norm_groups=8, token_norm=False)
  _check(vae, reference)


def test_export_is_flux_layout_per_diffusers_converter(reference, tmp_path):
  """Our FLUX-named export, converted by diffusers' own LDM converter, loads strictly into
  diffusers and reproduces it: an independent check of the exporter's names and layouts."""
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
  from safetensors.torch import load_file
  model = reference[0]
  vae = interop.vae_from_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                    norm_groups=8, token_norm=False)
  path = interop.export_vae(vae, str(tmp_path / "export"))
  converted = convert_ldm_vae_checkpoint(load_file(path), dict(model.config))
  fresh = _diffusers_vae(seed=1)
  result = fresh.load_state_dict(converted, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  for k, v in model.state_dict().items():
    torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def test_token_norm_matches_nextstep_reference(reference):
  """NextStep's encoder norm: patchify the mean (c, pi, pj order), layer-norm each patch's
  C*p*p values without affine (eps 1e-6), unpatchify; logvar untouched."""
  model, x = reference[0], reference[1]
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  vae = interop.vae_from_state_dict(sd, norm_groups=8, token_norm=True, patch_size=2)
  with torch.no_grad():
    mean = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean  # (B, C, H, W)
    b, c, h, w = mean.shape
    t = mean.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    t = torch.nn.functional.layer_norm(t.permute(0, 2, 3, 1), (c * 4,), eps=1e-6).permute(0, 3, 1, 2)
    ref = t.reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
  ours, _ = vae.encode_moments(jnp.asarray(x))
  assert_close_fp32(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=RTOL)


def test_no_mid_attention_variant():
  model = _diffusers_vae(seed=2, mid_attention=False)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  vae = interop.vae_from_state_dict(sd, norm_groups=8, token_norm=False)
  assert not vae.config.mid_attention
  x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mean = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
  m, _ = vae.encode_raw_moments(jnp.asarray(x))
  assert_close_fp32(m, mean.permute(0, 2, 3, 1).numpy(), rtol=RTOL)


class Payload:
  """An arbitrary pickled object: torch.load(weights_only=True) must refuse to rebuild it."""


def test_pickled_code_is_refused(tmp_path):
  path = tmp_path / "checkpoint.pt"
  torch.save({"encoder.conv_in.weight": torch.zeros(1), "evil": Payload()}, path)
  with pytest.raises(ValueError, match="weights_only=True"):
    interop.load_state_dict(str(path))
  torch.save([torch.zeros(1)], tmp_path / "list.pt")
  with pytest.raises(ValueError, match="does not hold a state dict"):
    interop.load_state_dict(str(tmp_path / "list.pt"))


def test_bfloat16_and_wrapped_checkpoints(tmp_path, reference):
  model = reference[0]
  sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  torch.save({"state_dict": sd}, tmp_path / "wrapped.ckpt")  # a trainer's wrapper
  loaded = interop.load_state_dict(str(tmp_path / "wrapped.ckpt"))
  assert loaded["encoder.conv_in.weight"].dtype == np.float32
  from safetensors.torch import save_file
  save_file(sd, str(tmp_path / "bf16.safetensors"))
  loaded2 = interop.load_state_dict(str(tmp_path / "bf16.safetensors"))
  np.testing.assert_array_equal(loaded2["encoder.conv_in.weight"], loaded["encoder.conv_in.weight"])
