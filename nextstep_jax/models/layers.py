"""Small shared pieces: parameters with logical axes, norms, RoPE, dtype helpers.

Parameters are ``nnx.Param`` with an ``axes`` metadata tuple of logical axis names (one per dimension);
``parallel.param_axes`` reads them and the config's rules table maps them onto the mesh. Weights of
repeated layers are stacked along a leading ``layers`` axis and run under ``jax.lax.scan``.
Naming convention relied on by the optimizer's weight-decay mask: every norm weight ends in ``scale``
and every bias ends in ``bias``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter initialised by ``init(key, shape, dtype)`` carrying its logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def normal_init(std: float) -> Callable:
  return jax.nn.initializers.normal(stddev=std)


def xavier_uniform(stacked: bool = False) -> Callable:
  """Xavier-uniform over the last two dims (in, out); a leading layer dim is a batch dim."""
  if stacked:
    return jax.nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
  return jax.nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in fp32, cast back to the input dtype (Qwen2)."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (scale.astype(jnp.float32) * x32).astype(dtype)


def layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None,
               eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last dim in fp32; affine when scale/bias are given."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape positions.shape + (head_dim,), in the half-rotation layout of Qwen2/Llama."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., hd/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_blhd: jax.Array, cos_bld: jax.Array, sin_bld: jax.Array) -> jax.Array:
  """Rotates (B, L, H, hd) by per-position cos/sin (B, L, hd), in fp32."""
  dtype = x_blhd.dtype
  x = x_blhd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_bld[:, :, None, :] + rotated * sin_bld[:, :, None, :]
  return out.astype(dtype)


def remat_policy(name: str):
  """Maps the config's remat name to a jax.checkpoint policy (None = no rematerialisation)."""
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"unknown remat policy {name!r}; expected 'none', 'full' or 'dots'")
