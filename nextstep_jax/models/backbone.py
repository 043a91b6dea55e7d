"""The Qwen2 / Qwen2.5 decoder (SPEC §3) in Flax NNX, with stacked, scanned layers and a KV cache.

Pre-norm blocks: RMSNorm (fp32) -> GQA self-attention with RoPE and q/k/v bias (no o bias) -> residual ->
RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm; a separate, untied ``lm_head``. Parameters are fp32
(``param_dtype``) and cast to ``dtype`` for compute; logits come out in fp32.

Layer weights carry a leading ``layers`` dim and run under ``jax.lax.scan`` (compile time flat in depth),
each layer optionally under ``jax.checkpoint`` with the configured remat policy.

KV cache: a dict ``k``, ``v`` (layers, B, S, K, hd), ``segments`` (B, S) int32 (0 = empty slot) and
``index`` (int32 scalar: the next free slot). ``__call__`` with a cache writes the new keys at
``index .. index + L - 1`` and attends over the whole cache; prefill and one-token decode are the same call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import parallel
from nextstep_jax.models import attention as attn_lib
from nextstep_jax.models import layers as L

Cache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str = "xla"
  document_mask: bool = True

  @classmethod
  def from_config(cls, cfg: Any) -> "BackboneConfig":
    """From ``config.model`` (a ConfigDict or dict); extra keys are ignored."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    kwargs = {f.name: get(f.name) for f in dataclasses.fields(cls) if get(f.name) is not None}
    return cls(**kwargs)

  def validate(self) -> None:
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} is not divisible by "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
    L.dtype_of(self.dtype)
    L.dtype_of(self.param_dtype)
    L.remat_policy(self.remat)
    if self.attention not in attn_lib.IMPLEMENTATIONS:
      raise ValueError(f"model.attention={self.attention!r}; expected one of {attn_lib.IMPLEMENTATIONS}")


# Per-layer weight names, their shapes (given the config) and logical axes.
def _layer_specs(c: BackboneConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...], str]]:
  d, h, k, hd, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  return {
      "input_norm_scale": ((d,), ("norm",), "ones"),
      "q_kernel": ((d, h, hd), ("embed", "heads", "head_dim"), "normal"),
      "q_bias": ((h, hd), ("heads", "head_dim"), "zeros"),
      "k_kernel": ((d, k, hd), ("embed", "kv_heads", "head_dim"), "normal"),
      "k_bias": ((k, hd), ("kv_heads", "head_dim"), "zeros"),
      "v_kernel": ((d, k, hd), ("embed", "kv_heads", "head_dim"), "normal"),
      "v_bias": ((k, hd), ("kv_heads", "head_dim"), "zeros"),
      "o_kernel": ((h, hd, d), ("heads", "head_dim", "embed"), "normal"),
      "post_norm_scale": ((d,), ("norm",), "ones"),
      "gate_kernel": ((d, f), ("embed", "mlp"), "normal"),
      "up_kernel": ((d, f), ("embed", "mlp"), "normal"),
      "down_kernel": ((f, d), ("mlp", "embed"), "normal"),
  }


LAYER_PARAMS = tuple(_layer_specs(BackboneConfig(1, 2, 1, 1, 1, 2, 1)).keys())


class Layers(nnx.Module):
  """All decoder layers, weights stacked along a leading ``layers`` dim."""

  def __init__(self, c: BackboneConfig, *, rngs: nnx.Rngs):
    pdtype = L.dtype_of(c.param_dtype)
    inits = {"ones": L.ones_init, "zeros": L.zeros_init, "normal": L.normal_init(0.02)}
    for name, (shape, axes, init) in _layer_specs(c).items():
      setattr(self, name, L.param(rngs, inits[init], (c.num_layers, *shape), ("layers", *axes), pdtype))

  def stacked(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in LAYER_PARAMS}


def _layer(c: BackboneConfig, x, p, cos, sin, q_slots, q_segments, cache_k, cache_v, kv_segments, index):
  """One pre-norm decoder layer. x (B, L, D); p: this layer's weights. Returns (x, k_all, v_all)."""
  dtype = L.dtype_of(c.dtype)
  w = {n: v.astype(dtype) for n, v in p.items()}
  h = L.rms_norm(x, p["input_norm_scale"], c.rms_norm_eps)
  q = jnp.einsum("bld,dhk->blhk", h, w["q_kernel"]) + w["q_bias"]
  k = jnp.einsum("bld,dhk->blhk", h, w["k_kernel"]) + w["k_bias"]
  v = jnp.einsum("bld,dhk->blhk", h, w["v_kernel"]) + w["v_bias"]
  q = L.apply_rope(q, cos, sin)
  k = L.apply_rope(k, cos, sin)
  if cache_k is not None:
    k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
  out = attn_lib.attention(q, k.astype(dtype), v.astype(dtype), q_slots=q_slots, q_segments=q_segments,
                           kv_segments=kv_segments, document_mask=c.document_mask,
                           implementation=c.attention)
  x = x + jnp.einsum("blhk,hkd->bld", out, w["o_kernel"])
  h = L.rms_norm(x, p["post_norm_scale"], c.rms_norm_eps)
  gate = jnp.einsum("bld,df->blf", h, w["gate_kernel"])
  up = jnp.einsum("bld,df->blf", h, w["up_kernel"])
  x = x + jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, w["down_kernel"])
  return parallel.constrain(x, ("batch", "length", "embed")), k, v


class Backbone(nnx.Module):
  """Qwen2 decoder: ``embed`` tokens, run ``__call__`` on embeddings, ``logits`` from hidden states."""

  def __init__(self, c: BackboneConfig, *, rngs: nnx.Rngs):
    c.validate()
    self.config = c
    pdtype = L.dtype_of(c.param_dtype)
    self.embed_tokens = L.param(rngs, L.normal_init(0.02), (c.vocab_size, c.hidden_size),
                                ("vocab", "embed"), pdtype)
    self.layers = Layers(c, rngs=rngs)
    self.final_norm_scale = L.param(rngs, L.ones_init, (c.hidden_size,), ("norm",), pdtype)
    self.lm_head_kernel = L.param(rngs, L.normal_init(0.02), (c.hidden_size, c.vocab_size),
                                  ("embed", "vocab"), pdtype)

  def embed(self, tokens_bl: jax.Array) -> jax.Array:
    """(B, L) int -> (B, L, D) in the compute dtype."""
    # Rows are looked up in a table split over vocab only (its width gathered, in the compute dtype):
    # a gather from a width-split table would come out split by width and need the whole (B, L, D)
    # replicated to move to the per-row layout of the activations.
    table = parallel.constrain(self.embed_tokens[...].astype(L.dtype_of(self.config.dtype)), ("vocab", None))
    x = jnp.take(table, tokens_bl, axis=0)
    return parallel.constrain(x, ("batch", "length", "embed"))

  def logits(self, h_bld: jax.Array) -> jax.Array:
    """Final-normed hidden (B, L, D) -> fp32 logits (B, L, V)."""
    # Cast on the shards, so FSDP gathers bf16 rather than fp32 weights.
    w = parallel.constrain(self.lm_head_kernel[...].astype(h_bld.dtype), ("embed", "vocab"))
    return jnp.einsum("bld,dv->blv", h_bld, w, preferred_element_type=jnp.float32)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    c = self.config
    dtype = dtype or L.dtype_of(c.dtype)
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segments": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}

  def __call__(self, x_bld: jax.Array, positions_bl: jax.Array, segment_ids_bl: jax.Array | None = None,
               cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
    """Runs all layers on input embeddings. Returns (final-normed hidden (B, L, D), updated cache).

    positions_bl: RoPE positions (restart per packed sample); segment_ids_bl: 1.. per sample, 0 = pad
    (default: all ones). With a cache, the inputs occupy slots index .. index + L - 1.
    """
    c = self.config
    b, l, _ = x_bld.shape
    if segment_ids_bl is None:
      segment_ids_bl = jnp.ones((b, l), jnp.int32)
    cos, sin = L.rope_cos_sin(positions_bl, c.head_dim, c.rope_theta)
    params = self.layers.stacked()
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      kv_segments = segment_ids_bl
    else:
      index = cache["index"]
      kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segments"], segment_ids_bl, index, axis=1)
    q_slots = jnp.broadcast_to(index + jnp.arange(l, dtype=jnp.int32), (b, l))

    def body(x, xs):
      if cache is None:
        p, ck, cv = xs, None, None
      else:
        p, ck, cv = xs
      x, k, v = _layer(c, x, p, cos, sin, q_slots, segment_ids_bl, ck, cv, kv_segments, index)
      return x, ((k, v) if cache is not None else None)

    policy = L.remat_policy(c.remat)
    if policy is not None:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    xs = params if cache is None else (params, cache["k"], cache["v"])
    x, kv = jax.lax.scan(body, x_bld.astype(L.dtype_of(c.dtype)), xs)
    h = L.rms_norm(x, self.final_norm_scale[...], c.rms_norm_eps)
    if cache is None:
      return h, None
    new_cache = {"k": kv[0], "v": kv[1], "segments": kv_segments, "index": index + l}
    return h, new_cache

  def forward_logits(self, tokens_bl: jax.Array, positions_bl: jax.Array | None = None,
                     segment_ids_bl: jax.Array | None = None) -> jax.Array:
    """Plain language-model forward: tokens -> fp32 logits (used by parity tests and text scoring)."""
    b, l = tokens_bl.shape
    if positions_bl is None:
      positions_bl = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    h, _ = self(self.embed(tokens_bl), positions_bl, segment_ids_bl)
    return self.logits(h)


def num_params(c: BackboneConfig) -> int:
  """Parameter count from the config alone (embeddings, layers, final norm, lm_head)."""
  per_layer = sum(math.prod(s) for s, _, _ in _layer_specs(c).values())
  return 2 * c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size
