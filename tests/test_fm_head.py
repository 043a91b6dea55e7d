"""Flow-matching head: parameter counts of SPEC §4, init, and parity with a PyTorch SimpleMLPAdaLN."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nextstep_jax.interop import names
from nextstep_jax.interop.params import load_pure_params, pure_params
from nextstep_jax.models import fm_head
from tests.tolerance import assert_close_fp32

SIZES = {"small": (6, 1024, 40_288_320), "base": (12, 1536, 157_228_096), "large": (24, 2048, 527_528_000)}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_param_counts_match_paper(size):
  layers, dim, expected = SIZES[size]
  c = fm_head.HeadConfig(dim=dim, num_layers=layers, cond_dim=5120, token_dim=64)
  m = nnx.eval_shape(lambda: fm_head.FlowHead(c, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))) == expected
  assert fm_head.num_params(dim, layers, 5120, 64) == expected


def test_init_zeroes_adaln_and_output():
  c = fm_head.HeadConfig(dim=32, num_layers=2, cond_dim=16, token_dim=8)
  m = fm_head.FlowHead(c, rngs=nnx.Rngs(0))
  for name in ("ada_kernel", "ada_bias", "final_ada_kernel", "final_kernel", "final_bias"):
    assert not np.any(np.asarray(getattr(m, name)[...])), name
  assert abs(float(np.std(m.time_in_kernel[...])) - 0.02) < 0.004
  out = m(jnp.ones((5, 8)), jnp.linspace(0, 1, 5), jnp.ones((5, 16)))
  assert out.shape == (5, 8) and not np.any(np.asarray(out))


def test_timestep_embedding_is_cos_sin_of_raw_t():
  emb = fm_head.timestep_embedding(jnp.asarray([0.0, 0.5]))
  assert emb.shape == (2, 256)
  np.testing.assert_allclose(emb[0, :128], 1.0)
  np.testing.assert_allclose(emb[0, 128:], 0.0)
  np.testing.assert_allclose(emb[1, 0], np.cos(0.5), rtol=1e-6)  # first frequency is 1
  np.testing.assert_allclose(emb[1, 128 + 127], np.sin(0.5 * np.exp(-np.log(1e4) * 127 / 128)), rtol=1e-5)


def _torch_head(torch, dim, layers, cond_dim, token_dim):
  """An independent PyTorch implementation of SPEC §4 (the layout of the public release)."""
  nn = torch.nn

  class TimestepEmbedder(nn.Module):
    def __init__(self):
      super().__init__()
      self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
      half = 128
      freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
      args = t[:, None].float() * freqs[None]
      return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

  class ResBlock(nn.Module):
    def __init__(self):
      super().__init__()
      self.in_ln = nn.LayerNorm(dim, eps=1e-6)
      self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
      self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x, y):
      shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
      h = self.in_ln(x) * (1 + scale) + shift
      return x + gate * self.mlp(h)

  class FinalLayer(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
      self.linear = nn.Linear(dim, token_dim)
      self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, y):
      shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
      return self.linear(self.norm_final(x) * (1 + scale) + shift)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.time_embed = TimestepEmbedder()
      self.cond_embed = nn.Linear(cond_dim, dim)
      self.input_proj = nn.Linear(token_dim, dim)
      self.res_blocks = nn.ModuleList([ResBlock() for _ in range(layers)])
      self.final_layer = FinalLayer()

    def forward(self, x, t, c):
      y = self.time_embed(t) + self.cond_embed(c)
      x = self.input_proj(x)
      for blk in self.res_blocks:
        x = blk(x, y)
      return self.final_layer(x, y)

  return Net()


@pytest.mark.parity
def test_matches_pytorch_reference_on_random_weights():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  dim, layers, cond_dim, token_dim = 32, 3, 24, 16
  net = _torch_head(torch, dim, layers, cond_dim, token_dim)
  with torch.no_grad():
    for p in net.parameters():
      p.copy_(torch.randn_like(p) * 0.3)  # non-zero everywhere, unlike the init
  sd = {"image_head.net." + k: v.detach().numpy() for k, v in net.state_dict().items()}
  c = fm_head.HeadConfig(dim=dim, num_layers=layers, cond_dim=cond_dim, token_dim=token_dim)
  head = fm_head.FlowHead(c, rngs=nnx.Rngs(0))
  ours = {}
  for path, (name, (_, from_ckpt)) in names.NEXTSTEP_TOP_MAP.items():
    if path[0] == "head":
      ours[path[1]] = from_ckpt(sd[name])
  for key, (suffix, (_, from_ckpt)) in names.HEAD_BLOCK_MAP.items():
    ours[key] = np.stack([from_ckpt(sd[f"image_head.net.res_blocks.{i}.{suffix}"]) for i in range(layers)])
  load_pure_params(head, ours, "torch head")
  rng = np.random.default_rng(0)
  x, t, cnd = rng.normal(size=(7, token_dim)), rng.uniform(size=7), rng.normal(size=(7, cond_dim))
  with torch.no_grad():
    ref = net(torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
              torch.tensor(cnd, dtype=torch.float32)).numpy()
  out = head(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(cnd, jnp.float32))
  # Parity: 3e-6 of the outputs' magnitude (about 32 here, so about the former bare atol=1e-4).
  assert_close_fp32(out, ref, rtol=3e-6)
  assert set(pure_params(head)) == set(ours)
