"""The sampler's own weight layout: per-layer weights and a per-layer KV cache, laid out once per call.

Training keeps the decoder's and the head's weights stacked along a ``layers`` axis and scans over them
(compile time flat in depth). Inside the sampling loop a scan is the wrong layout: every step slices
each layer's weights out of the stack and, with a cache, restacks the whole cache, so a decode step
reads and writes far more bytes than the weights and the cache it needs. Here the sampler splits the
stacks once, before its loop, into one array per layer (the same weights; the training layout is
untouched), runs the layers unrolled, and keeps one (k, v) pair per layer, written in place. The cost:
during a call the device holds the layer and head weights twice (XLA keeps the split slices as the
loop's own buffers), and compile time grows with depth.

The flow-matching head is laid out for its inner loop (``head_layout``): per-block weights, all
adaLN projections (every block's and the final layer's) fused into one matmul, since they share one
input; the time embeddings of the fixed grid are computed once per image (``FlowHead.time_embed`` of ``flow.eval_grid``) and the
condition's projection once per token (``FlowHead.cond_embed``), and since the adaLN modulations depend
on the time and the condition but not on the noisy token, those of all of a token's evaluations come
from one matmul per token (``head_ada``). One evaluation is then the input projection and the blocks'
MLPs: for a head of n blocks of width D it reads 2 n D² weights instead of 5 n D² + 2 D². The layer code is the model's own (``backbone._layer``,
``fm_head.ada_block``, ``fm_head.final_layer``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nextstep_jax import parallel
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import layers as L
from nextstep_jax.models import nextstep as ns

# A per-layer cache: {"k": (L arrays (B, S, K, hd)), "v": (...), "segments": (B, S), "index": ()}.
Cache = dict


def split_layers(stacked: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], ...]:
  """{name: (L, ...)} -> L dicts {name: (...)} (static slices, done once, outside the loop)."""
  n = next(iter(stacked.values())).shape[0]
  return tuple({name: v[i] for name, v in stacked.items()} for i in range(n))


def decoder_layout(model: ns.NextStep) -> dict:
  """The backbone's layers split per layer, and its final norm."""
  return {"layers": split_layers(model.backbone.layers.stacked()),
          "final_norm_scale": model.backbone.final_norm_scale[...]}


def init_cache(c: bb.BackboneConfig, batch: int, max_len: int) -> Cache:
  dtype = L.dtype_of(c.dtype)
  shape = (batch, max_len, c.num_kv_heads, c.head_dim)
  zeros = lambda: parallel.constrain(jnp.zeros(shape, dtype), ("batch", "length", "kv_heads", "head_dim"))
  return {"k": tuple(zeros() for _ in range(c.num_layers)), "v": tuple(zeros() for _ in range(c.num_layers)),
          "segments": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def stacked_cache(cache: Cache) -> bb.Cache:
  """A per-layer cache as the backbone's stacked one (unified generation keeps that between images)."""
  return dict(cache, k=jnp.stack(cache["k"]), v=jnp.stack(cache["v"]))


def per_layer_cache(cache: bb.Cache) -> Cache:
  n = cache["k"].shape[0]
  return dict(cache, k=tuple(cache["k"][i] for i in range(n)), v=tuple(cache["v"][i] for i in range(n)))


def decode(c: bb.BackboneConfig, dec: dict, x_bld: jax.Array, positions_bl: jax.Array,
           segment_ids_bl: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """``Backbone.__call__`` with a cache, over per-layer weights and cache: the inputs occupy slots
  index .. index + L - 1. Returns (final-normed hidden (B, L, D), cache)."""
  b, l, _ = x_bld.shape
  cos, sin = L.rope_cos_sin(positions_bl, c.head_dim, c.rope_theta)
  index = cache["index"]
  kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segments"], segment_ids_bl, index, axis=1)
  q_slots = jnp.broadcast_to(index + jnp.arange(l, dtype=jnp.int32), (b, l))
  x = x_bld.astype(L.dtype_of(c.dtype))
  ks, vs = [], []
  for p, ck, cv in zip(dec["layers"], cache["k"], cache["v"]):
    x, k, v = bb._layer(c, x, p, cos, sin, q_slots, segment_ids_bl, ck, cv, kv_segments, index)  # pylint: disable=protected-access
    ks.append(k)
    vs.append(v)
  h = L.rms_norm(x, dec["final_norm_scale"], c.rms_norm_eps)
  return h, {"k": tuple(ks), "v": tuple(vs), "segments": kv_segments, "index": index + l}


# ---------------------------------------------------------------------------------------------
# The flow-matching head's inner loop
# ---------------------------------------------------------------------------------------------

def head_layout(head: fm_head.FlowHead) -> dict:
  """The head's weights for its inner loop, in the compute dtype: per-block MLP and norm weights, and
  the adaLN projections of all blocks and of the final layer as one (D, (3n + 2) D) matrix."""
  dt = L.dtype_of(head.config.dtype)
  get = lambda name: getattr(head, name)[...].astype(dt)
  n, d = head.config.num_layers, head.config.dim
  blocks = split_layers({name: get(name) for name in ("ln_scale", "ln_bias", "mlp_in_kernel", "mlp_in_bias",
                                                      "mlp_out_kernel", "mlp_out_bias")})
  ada = jnp.concatenate([jnp.moveaxis(get("ada_kernel"), 0, 1).reshape(d, n * 3 * d), get("final_ada_kernel")],
                        axis=1)
  ada_bias = jnp.concatenate([get("ada_bias").reshape(n * 3 * d), get("final_ada_bias")])
  return {"blocks": blocks, "ada_kernel": parallel.constrain(ada, ("fm_embed", "fm_mlp")), "ada_bias": ada_bias,
          "input_kernel": get("input_kernel"), "input_bias": get("input_bias"),
          "final_kernel": get("final_kernel"), "final_bias": get("final_bias")}


def head_ada(hl: dict, y: jax.Array) -> jax.Array:
  """The adaLN modulations of every block and of the final layer, (..., (3n + 2) D), from y = time
  embedding + condition projection (..., D). They do not depend on the noisy token, so the sampler
  computes those of all of a token's evaluations in one matmul (its weights read once per token)."""
  return jax.nn.silu(y) @ hl["ada_kernel"] + hl["ada_bias"]


def head_velocity(hl: dict, x_bd: jax.Array, ada_rd: jax.Array, groups: int) -> jax.Array:
  """The head's velocity (G*B, token_dim) fp32 for the shared noisy token x (B, token_dim) and each row's
  modulations ``head_ada`` (G*B, (3n + 2) D). Equals ``FlowHead.__call__`` on x tiled G times."""
  dt = hl["input_kernel"].dtype
  d = hl["input_kernel"].shape[1]
  x = jnp.tile(x_bd.astype(dt) @ hl["input_kernel"] + hl["input_bias"], (groups, 1))
  x = parallel.constrain(x, ("batch", "fm_embed"))
  part = lambda j: ada_rd[:, j * d:(j + 1) * d]
  for i, p in enumerate(hl["blocks"]):
    x = parallel.constrain(fm_head.ada_block(x, p, part(3 * i), part(3 * i + 1), part(3 * i + 2)),
                           ("batch", "fm_embed"))
  n = len(hl["blocks"])
  return fm_head.final_layer(x, part(3 * n), part(3 * n + 1), hl["final_kernel"], hl["final_bias"])
