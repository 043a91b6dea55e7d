"""The sampler's own weight layout: per-layer weights and a per-layer KV cache.

Training keeps the decoder's and the head's weights stacked along a ``layers`` axis and scans over them
(compile time flat in depth). Inside the sampling loop a scan is the wrong layout: every step slices
each layer's weights out of the stack and, with a cache, restacks the whole cache, so a decode step
reads and writes far more bytes than the weights and the cache it needs. Here the sampler reads one
array per layer (the same weights; the training layout is untouched), runs the layers unrolled, and
keeps one (k, v) pair per layer, written in place. Compile time grows with depth.

Where the split happens decides the memory. Split inside the sampler's program, the slices are the
program's own buffers, so during a call the device holds the layer (and head) weights twice.
``sampler_weights`` lays them out once, outside, into the arrays the sampler is given
(``SamplerWeights``, what ``sample_guided`` takes in place of a model). With ``consume=True`` it frees
each of the model's stacked weights as soon as its new layout exists: the device then holds the weights
once, plus one stacked weight while it lays them out. The sampling commands (``sample``, ``evaluate``)
do that once per run. Given the model itself, ``sample_guided`` lays the weights out anew at each call.

The flow-matching head is laid out for its inner loop (``head_layout``): per-block weights, all
adaLN projections (every block's and the final layer's) fused into one matmul, since they share one
input (``fuse_ada``); the time embeddings of the fixed grid are computed once per image
(``FlowHead.time_embed`` of ``flow.eval_grid``) and the condition's projection once per token
(``FlowHead.cond_embed``), and since the adaLN modulations depend on the time and the condition but not
on the noisy token, those of all of a token's evaluations come from one matmul per token (``head_ada``).
One evaluation is then the input projection and the blocks' MLPs: for a head of n blocks of width D it
reads 2 n D² weights instead of 5 n D² + 2 D². The layer code is the model's own (``backbone._layer``,
``fm_head.ada_block``, ``fm_head.final_layer``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nextstep_jax import parallel
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import layers as L
from nextstep_jax.models import nextstep as ns

# A per-layer cache: {"k": (L arrays (B, S, K, hd)), "v": (...), "segments": (B, S), "index": ()}.
Cache = dict

# The head's weights ``head_layout`` lays out anew: the blocks' (split per block) and the adaLN ones (fused).
HEAD_BLOCK_PARAMS = ("ln_scale", "ln_bias", "mlp_in_kernel", "mlp_in_bias", "mlp_out_kernel", "mlp_out_bias")
HEAD_ADA_PARAMS = ("ada_kernel", "ada_bias", "final_ada_kernel", "final_ada_bias")


def split_layers(stacked: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], ...]:
  """{name: (L, ...)} -> L dicts {name: (...)} (static slices, done once, outside the loop)."""
  n = next(iter(stacked.values())).shape[0]
  return tuple({name: v[i] for name, v in stacked.items()} for i in range(n))


def decoder_layout(model: ns.NextStep) -> dict:
  """The backbone's layers split per layer, and its final norm."""
  return {"layers": split_layers(model.backbone.layers.stacked()),
          "final_norm_scale": model.backbone.final_norm_scale[...]}


def _is_layer_weight(path, _) -> bool:
  """nnx filter: the backbone's stacked decoder weights (``backbone.Layers``)."""
  return tuple(path[:2]) == ("backbone", "layers")


def _is_head_weight(path, _) -> bool:
  """nnx filter: the head's weights that ``head_layout`` lays out anew (the blocks' and the adaLN ones)."""
  return len(path) == 2 and path[0] == "head" and path[1] in HEAD_BLOCK_PARAMS + HEAD_ADA_PARAMS


@jax.tree_util.register_pytree_node_class
class SamplerWeights:
  """A model's weights as the sampler reads them: the backbone's decoder weights one array per layer
  (`layers`: L dicts {name: array}), the head's block weights one dict per block (`head_blocks`) and its
  adaLN projections fused (`head_ada`: ``fuse_ada``'s kernel and bias), every other variable as in the
  model (`rest`, an nnx State). ``sample_guided`` and the public samplers take it in place of the model;
  ``sampler_weights`` makes it. A pytree (the graph definition, the config and the moved weights' trees
  are static), so it goes into a jitted function whole."""

  def __init__(self, config: ns.NextStepConfig, graphdef, defs, rest, layers, head_blocks, head_ada):
    self.config, self.graphdef, self.defs = config, graphdef, defs
    self.rest, self.layers, self.head_blocks, self.head_ada = rest, tuple(layers), tuple(head_blocks), head_ada

  def tree_flatten(self):
    return (self.rest, self.layers, self.head_blocks, self.head_ada), (self.config, self.graphdef, self.defs)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*aux, *children)

  def model(self) -> ns.NextStep:
    """The model, inside a jitted function. The weights this holds laid out anew are put back as the model
    has them (stacked, unfused); XLA drops that where only the sampler's layout is read (``decoder``,
    ``head``), so it costs nothing there."""
    (layers_def, layer_names), (head_def, head_names) = self.defs
    layers = jax.tree.unflatten(layers_def, [jnp.stack([p[n] for p in self.layers]) for n in layer_names])
    head = dict(zip(HEAD_ADA_PARAMS, unfuse_ada(*self.head_ada, len(self.head_blocks))))
    head.update({n: jnp.stack([p[n] for p in self.head_blocks]) for n in HEAD_BLOCK_PARAMS})
    head = jax.tree.unflatten(head_def, [head[n] for n in head_names])
    return nnx.merge(self.graphdef, layers, head, self.rest)

  def decoder(self, model: ns.NextStep) -> dict:
    """``decoder_layout`` with no split: the per-layer weights as held, and `model`'s final norm."""
    return {"layers": self.layers, "final_norm_scale": model.backbone.final_norm_scale[...]}

  def head(self, model: ns.NextStep) -> dict:
    """``head_layout`` with no split and no fusion: the blocks' and the adaLN weights as held."""
    return head_layout(model.head, self.head_blocks, self.head_ada)


def _drop_leading(s):
  """The sharding of one layer of a stacked weight placed by `s`: its spec less the layers axis."""
  if isinstance(s, NamedSharding):
    return NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))
  return s


def _fused_sharding(kernel_sharding, shape):
  """Where ``fuse_ada``'s kernel (D, (3n + 2) D) goes: as the blocks' (n, D, 3D) kernel is sharded, less the
  layers axis (a mesh axis that does not divide its dimension left out)."""
  s = _drop_leading(kernel_sharding)
  if not isinstance(s, NamedSharding):
    return s
  spec = tuple(s.spec) + (None,) * (len(shape) - len(s.spec))
  size = lambda axes: math.prod(s.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
  return NamedSharding(s.mesh, PartitionSpec(*(a if a is None or dim % size(a) == 0 else None
                                               for a, dim in zip(spec, shape))))


def _unstack(x: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(x[i] for i in range(x.shape[0]))


def _abstract(x) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def sampler_weights(model: ns.NextStep, *, consume: bool = False) -> SamplerWeights:
  """`model`'s weights in the sampler's layout (``SamplerWeights``), placed as the model's were (each
  layer's or block's weights by the stacked weight's sharding less the layers axis). `consume`: free each
  of the model's weights that is laid out anew as soon as its new layout is made, one at a time, so the
  device holds at most the weights and one stacked weight; `model`'s layer and head weights are deleted
  (it cannot be used afterwards). An abstract model (``jax.ShapeDtypeStruct`` leaves, with or without
  shardings, as ``nnx.eval_shape`` or ``run.param_target`` give) gives abstract weights; host (numpy)
  weights give per-layer views of them (nothing to free). `model` already a ``SamplerWeights``: itself."""
  if isinstance(model, SamplerWeights):
    return model
  graphdef, stacked, head, rest = nnx.split(model, _is_layer_weight, _is_head_weight, ...)

  def unstack(x):
    if _abstract(x):
      sh = None if x.sharding is None else _drop_leading(x.sharding)
      return tuple(jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh) for _ in range(x.shape[0]))
    if not isinstance(x, jax.Array):  # a host array (numpy): its layers are views, sent with the call
      return _unstack(x)
    return jax.jit(_unstack, out_shardings=(_drop_leading(x.sharding),) * x.shape[0])(x)

  def done(made, *old):
    if consume and isinstance(old[0], jax.Array):  # the new layout made before the old goes, one at a time
      jax.block_until_ready(made)
      for x in old:
        x.delete()
    return made

  flat, layers_def = jax.tree_util.tree_flatten_with_path(stacked)
  layer_names = tuple(path[2].key for path, _ in flat)
  per_name = [done(unstack(x), x) for _, x in flat]
  layers = tuple({n: parts[i] for n, parts in zip(layer_names, per_name)} for i in range(len(per_name[0])))

  hflat, head_def = jax.tree_util.tree_flatten_with_path(head)
  head_names = tuple(path[1].key for path, _ in hflat)
  hw = {path[1].key: x for path, x in hflat}
  ada_in = [hw[n] for n in HEAD_ADA_PARAMS]
  shapes = jax.eval_shape(fuse_ada, *ada_in)
  where = tuple(None if getattr(x, "sharding", None) is None else _fused_sharding(x.sharding, o.shape)
                for o, x in zip(shapes, ada_in))
  if _abstract(ada_in[0]):
    ada = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=w) for o, w in zip(shapes, where))
  elif None in where:  # host arrays: fused on the default device
    ada = jax.jit(fuse_ada)(*ada_in)
  else:
    ada = done(jax.jit(fuse_ada, out_shardings=where)(*ada_in), *ada_in)
  per_block = {n: done(unstack(hw[n]), hw[n]) for n in HEAD_BLOCK_PARAMS}
  blocks = tuple({n: per_block[n][i] for n in HEAD_BLOCK_PARAMS} for i in range(model.config.head.num_layers))
  return SamplerWeights(model.config, graphdef, ((layers_def, layer_names), (head_def, head_names)), rest,
                        layers, blocks, ada)


def init_cache(c: bb.BackboneConfig, batch: int, max_len: int) -> Cache:
  dtype = L.dtype_of(c.dtype)
  shape = (batch, max_len, c.num_kv_heads, c.head_dim)
  zeros = lambda: parallel.constrain(jnp.zeros(shape, dtype), ("batch", "length", "kv_heads", "head_dim"))
  return {"k": tuple(zeros() for _ in range(c.num_layers)), "v": tuple(zeros() for _ in range(c.num_layers)),
          "segments": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}


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

def fuse_ada(ada_kernel, ada_bias, final_ada_kernel, final_ada_bias) -> tuple[jax.Array, jax.Array]:
  """The adaLN projections of the n blocks ((n, D, 3D), (n, 3D)) and of the final layer ((D, 2D), (2D,))
  as one projection ((D, (3n + 2) D), ((3n + 2) D,)): block i's (shift, scale, gate) in columns
  3iD .. 3(i + 1)D, the final layer's (shift, scale) last."""
  n, d = ada_kernel.shape[:2]
  return (jnp.concatenate([jnp.moveaxis(ada_kernel, 0, 1).reshape(d, n * 3 * d), final_ada_kernel], axis=1),
          jnp.concatenate([ada_bias.reshape(n * 3 * d), final_ada_bias]))


def unfuse_ada(kernel, bias, n: int) -> tuple[jax.Array, ...]:
  """``fuse_ada`` undone: (ada_kernel, ada_bias, final_ada_kernel, final_ada_bias)."""
  d = kernel.shape[0]
  return (jnp.moveaxis(kernel[:, :n * 3 * d].reshape(d, n, 3 * d), 1, 0), bias[:n * 3 * d].reshape(n, 3 * d),
          kernel[:, n * 3 * d:], bias[n * 3 * d:])


def head_layout(head: fm_head.FlowHead, blocks: tuple[dict, ...] | None = None, ada: tuple | None = None) -> dict:
  """The head's weights for its inner loop, in the compute dtype: per-block MLP and norm weights, and
  the adaLN projections of all blocks and of the final layer as one (D, (3n + 2) D) matrix (``fuse_ada``).
  `blocks` and `ada` (the fused kernel and bias): those already laid out (``SamplerWeights``), else they
  are made from `head`'s stacked weights."""
  dt = L.dtype_of(head.config.dtype)
  get = lambda name: getattr(head, name)[...]
  cast = lambda x: x.astype(dt)
  if blocks is None:
    blocks = split_layers({name: get(name) for name in HEAD_BLOCK_PARAMS})
  ada_kernel, ada_bias = fuse_ada(*(get(name) for name in HEAD_ADA_PARAMS)) if ada is None else ada
  return {"blocks": jax.tree.map(cast, blocks),
          "ada_kernel": parallel.constrain(cast(ada_kernel), ("fm_embed", "fm_mlp")), "ada_bias": cast(ada_bias),
          "input_kernel": cast(get("input_kernel")), "input_bias": cast(get("input_bias")),
          "final_kernel": cast(get("final_kernel")), "final_bias": cast(get("final_bias"))}


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
