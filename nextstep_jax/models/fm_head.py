"""The flow-matching head (SPEC §4): MAR's SimpleMLPAdaLN, predicting the velocity of one image token.

Inputs: noisy token x_t (token_dim), time t in [0, 1], condition c (backbone hidden size).
time_embed: 256-d sinusoid of raw t ([cos, sin], max_period 1e4) -> Linear -> SiLU -> Linear.
cond_embed: Linear(hidden, D); input_proj: Linear(token_dim, D); y = time + cond.
Residual blocks (stacked, scanned): h = LN(x)(affine) * (1 + scale) + shift; h = Linear -> SiLU -> Linear;
x = x + gate * h, with (shift, scale, gate) = Linear(D, 3D)(SiLU(y)).
Final: LN (no affine) * (1 + scale) + shift, (shift, scale) = Linear(D, 2D)(SiLU(y)); Linear(D, token_dim).
Init: xavier-uniform, zero bias; time-MLP weights normal(0.02); adaLN outputs and final Linear zero.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import parallel
from nextstep_jax.models import layers as L

TIME_FREQ_DIM = 256
MAX_PERIOD = 10000.0


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  dim: int
  num_layers: int
  cond_dim: int
  token_dim: int
  batch_mul: int = 4
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"


def timestep_embedding(t: jax.Array, dim: int = TIME_FREQ_DIM, max_period: float = MAX_PERIOD) -> jax.Array:
  """(N,) raw t -> (N, dim) [cos, sin] sinusoid in fp32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


_BLOCK_SPECS = ("ln_scale", "ln_bias", "mlp_in_kernel", "mlp_in_bias", "mlp_out_kernel", "mlp_out_bias",
                "ada_kernel", "ada_bias")


class FlowHead(nnx.Module):
  """Velocity predictor v(x_t, t, c)."""

  def __init__(self, c: HeadConfig, *, rngs: nnx.Rngs):
    self.config = c
    d, n, pd = c.dim, c.num_layers, L.dtype_of(c.param_dtype)
    xavier, xavier_n = L.xavier_uniform(), L.xavier_uniform(stacked=True)
    z, one, t_init = L.zeros_init, L.ones_init, L.normal_init(0.02)
    p = lambda init, shape, axes: L.param(rngs, init, shape, axes, pd)
    self.time_in_kernel = p(t_init, (TIME_FREQ_DIM, d), (None, "fm_embed"))
    self.time_in_bias = p(z, (d,), ("fm_embed",))
    self.time_out_kernel = p(t_init, (d, d), ("fm_embed", "fm_mlp"))
    self.time_out_bias = p(z, (d,), ("fm_mlp",))
    self.cond_kernel = p(xavier, (c.cond_dim, d), ("embed", "fm_mlp"))
    self.cond_bias = p(z, (d,), ("fm_mlp",))
    self.input_kernel = p(xavier, (c.token_dim, d), (None, "fm_mlp"))
    self.input_bias = p(z, (d,), ("fm_mlp",))
    self.ln_scale = p(one, (n, d), ("layers", "norm"))
    self.ln_bias = p(z, (n, d), ("layers", "norm"))
    self.mlp_in_kernel = p(xavier_n, (n, d, d), ("layers", "fm_embed", "fm_mlp"))
    self.mlp_in_bias = p(z, (n, d), ("layers", "fm_mlp"))
    self.mlp_out_kernel = p(xavier_n, (n, d, d), ("layers", "fm_mlp", "fm_embed"))
    self.mlp_out_bias = p(z, (n, d), ("layers", "fm_embed"))
    self.ada_kernel = p(z, (n, d, 3 * d), ("layers", "fm_embed", "fm_mlp"))
    self.ada_bias = p(z, (n, 3 * d), ("layers", "fm_mlp"))
    self.final_ada_kernel = p(z, (d, 2 * d), ("fm_embed", "fm_mlp"))
    self.final_ada_bias = p(z, (2 * d,), ("fm_mlp",))
    self.final_kernel = p(z, (d, c.token_dim), ("fm_embed", None))
    self.final_bias = p(z, (c.token_dim,), (None,))

  def _w(self, name: str) -> jax.Array:
    return getattr(self, name)[...].astype(L.dtype_of(self.config.dtype))

  def time_embed(self, t: jax.Array) -> jax.Array:
    """(N,) raw t -> the time MLP's output (N, D) in the compute dtype."""
    temb = parallel.constrain(timestep_embedding(t).astype(L.dtype_of(self.config.dtype)), ("batch", None))
    temb = temb @ self._w("time_in_kernel") + self._w("time_in_bias")
    return jax.nn.silu(temb) @ self._w("time_out_kernel") + self._w("time_out_bias")

  def cond_embed(self, cond: jax.Array) -> jax.Array:
    """(N, cond_dim) -> (N, D): the condition's projection, added to the time embedding."""
    return cond.astype(L.dtype_of(self.config.dtype)) @ self._w("cond_kernel") + self._w("cond_bias")

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
    """x_t (N, token_dim), t (N,), cond (N, cond_dim) -> velocity (N, token_dim) in fp32."""
    c = self.config
    dt = L.dtype_of(c.dtype)
    y = parallel.constrain(self.time_embed(t) + self.cond_embed(cond), ("batch", "fm_embed"))
    x = parallel.constrain(x_t.astype(dt) @ self._w("input_kernel") + self._w("input_bias"), ("batch", "fm_embed"))
    sy = jax.nn.silu(y)
    blocks = {name: getattr(self, name)[...].astype(dt) for name in _BLOCK_SPECS}

    def block(x, p):
      s = parallel.constrain(sy, ("batch", "fm_embed"))  # a scan constant: pin it inside the loop too
      shift, scale, gate = jnp.split(s @ p["ada_kernel"] + p["ada_bias"], 3, axis=-1)
      return parallel.constrain(ada_block(x, p, shift, scale, gate), ("batch", "fm_embed")), None

    policy = L.remat_policy(c.remat)
    if policy is not None:
      block = jax.checkpoint(block, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(block, x, blocks)
    shift, scale = jnp.split(sy @ self._w("final_ada_kernel") + self._w("final_ada_bias"), 2, axis=-1)
    return final_layer(x, shift, scale, self._w("final_kernel"), self._w("final_bias"))


def ada_block(x: jax.Array, p: dict, shift: jax.Array, scale: jax.Array, gate: jax.Array) -> jax.Array:
  """One residual block given its adaLN (shift, scale, gate): x + gate * MLP(LN(x) (1 + scale) + shift)."""
  h = L.layer_norm(x, p["ln_scale"], p["ln_bias"], eps=1e-6) * (1 + scale) + shift
  h = jax.nn.silu(h @ p["mlp_in_kernel"] + p["mlp_in_bias"]) @ p["mlp_out_kernel"] + p["mlp_out_bias"]
  return x + gate * h


def final_layer(x: jax.Array, shift: jax.Array, scale: jax.Array, kernel: jax.Array, bias: jax.Array
                ) -> jax.Array:
  """The adaLN final layer (LN without affine) and the output projection; fp32 out."""
  x = L.layer_norm(x, eps=1e-6) * (1 + scale) + shift
  return (x @ kernel + bias).astype(jnp.float32)


def num_params(dim: int, num_layers: int, cond_dim: int, token_dim: int) -> int:
  """Closed-form parameter count (used to cross-check the module)."""
  d = dim
  time = TIME_FREQ_DIM * d + d + d * d + d
  cond = cond_dim * d + d
  inp = token_dim * d + d
  block = 2 * d + 2 * (d * d + d) + d * 3 * d + 3 * d
  final = d * 2 * d + 2 * d + d * token_dim + token_dim
  return time + cond + inp + num_layers * block + final
