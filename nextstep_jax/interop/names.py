"""Name and layout maps between this project's parameters and Hugging Face / PyTorch checkpoints.

Our parameters (``nnx.to_pure_dict`` of the model state) use stacked layers and (in, out) kernels;
checkpoints use one tensor per layer and PyTorch ``[out, in]`` Linear weights. Each map entry knows how to
go both ways, so export followed by import is exact.

Names follow SPEC §9: NextStep-1 checkpoints have no ``model.`` prefix; Qwen2.5 checkpoints
(``Qwen2ForCausalLM``) name the same backbone layers under ``model.`` with ``lm_head.weight`` outside it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from nextstep_jax.interop.safetensors_io import RowChunks

# (our layer-param name, checkpoint suffix, to_ckpt(x, cfg), from_ckpt(t, cfg)) for backbone layers.
# cfg is a BackboneConfig; kernels are (in, out) here, [out, in] there.




BACKBONE_LAYER_MAP: list[tuple[str, str, Callable, Callable]] = [
    ("input_norm_scale", "input_layernorm.weight", lambda x, c: x, lambda t, c: t),
    ("q_kernel", "self_attn.q_proj.weight",
     lambda x, c: x.reshape(c.hidden_size, -1).T, lambda t, c: t.T.reshape(c.hidden_size, c.num_heads, c.head_dim)),
    ("q_bias", "self_attn.q_proj.bias", lambda x, c: x.reshape(-1), lambda t, c: t.reshape(c.num_heads, c.head_dim)),
    ("k_kernel", "self_attn.k_proj.weight",
     lambda x, c: x.reshape(c.hidden_size, -1).T,
     lambda t, c: t.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim)),
    ("k_bias", "self_attn.k_proj.bias", lambda x, c: x.reshape(-1),
     lambda t, c: t.reshape(c.num_kv_heads, c.head_dim)),
    ("v_kernel", "self_attn.v_proj.weight",
     lambda x, c: x.reshape(c.hidden_size, -1).T,
     lambda t, c: t.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim)),
    ("v_bias", "self_attn.v_proj.bias", lambda x, c: x.reshape(-1),
     lambda t, c: t.reshape(c.num_kv_heads, c.head_dim)),
    ("o_kernel", "self_attn.o_proj.weight",
     lambda x, c: x.reshape(-1, c.hidden_size).T, lambda t, c: t.T.reshape(c.num_heads, c.head_dim, c.hidden_size)),
    ("post_norm_scale", "post_attention_layernorm.weight", lambda x, c: x, lambda t, c: t),
    ("gate_kernel", "mlp.gate_proj.weight", lambda x, c: x.T, lambda t, c: t.T),
    ("up_kernel", "mlp.up_proj.weight", lambda x, c: x.T, lambda t, c: t.T),
    ("down_kernel", "mlp.down_proj.weight", lambda x, c: x.T, lambda t, c: t.T),
]

_T = (lambda x: x.T, lambda t: t.T)
_I = (lambda x: x, lambda t: t)

# Top-level (unstacked) NextStep parameters: our path -> (checkpoint name, to, from).
NEXTSTEP_TOP_MAP: dict[tuple[str, ...], tuple[str, tuple[Callable, Callable]]] = {
    ("image_in_kernel",): ("image_in_projector.weight", _T),
    ("image_in_bias",): ("image_in_projector.bias", _I),
    ("image_out_kernel",): ("image_out_projector.weight", _T),
    ("image_out_bias",): ("image_out_projector.bias", _I),
    ("head", "time_in_kernel"): ("image_head.net.time_embed.mlp.0.weight", _T),
    ("head", "time_in_bias"): ("image_head.net.time_embed.mlp.0.bias", _I),
    ("head", "time_out_kernel"): ("image_head.net.time_embed.mlp.2.weight", _T),
    ("head", "time_out_bias"): ("image_head.net.time_embed.mlp.2.bias", _I),
    ("head", "cond_kernel"): ("image_head.net.cond_embed.weight", _T),
    ("head", "cond_bias"): ("image_head.net.cond_embed.bias", _I),
    ("head", "input_kernel"): ("image_head.net.input_proj.weight", _T),
    ("head", "input_bias"): ("image_head.net.input_proj.bias", _I),
    ("head", "final_ada_kernel"): ("image_head.net.final_layer.adaLN_modulation.1.weight", _T),
    ("head", "final_ada_bias"): ("image_head.net.final_layer.adaLN_modulation.1.bias", _I),
    ("head", "final_kernel"): ("image_head.net.final_layer.linear.weight", _T),
    ("head", "final_bias"): ("image_head.net.final_layer.linear.bias", _I),
}

# Stacked head blocks: our name -> (checkpoint suffix under image_head.net.res_blocks.{M}., to, from).
HEAD_BLOCK_MAP: dict[str, tuple[str, tuple[Callable, Callable]]] = {
    "ln_scale": ("in_ln.weight", _I),
    "ln_bias": ("in_ln.bias", _I),
    "mlp_in_kernel": ("mlp.0.weight", _T),
    "mlp_in_bias": ("mlp.0.bias", _I),
    "mlp_out_kernel": ("mlp.2.weight", _T),
    "mlp_out_bias": ("mlp.2.bias", _I),
    "ada_kernel": ("adaLN_modulation.1.weight", _T),
    "ada_bias": ("adaLN_modulation.1.bias", _I),
}


def _backbone_names(prefix: str) -> tuple[str, str, str, str]:
  """(embed, layer prefix, final norm, lm_head) checkpoint names for a naming scheme."""
  return (f"{prefix}embed_tokens.weight", f"{prefix}layers", f"{prefix}norm.weight", "lm_head.weight")


def host_slice(x: Any, start: int | None = None, stop: int | None = None, axis: int = 0) -> np.ndarray:
  """`x` (whole, or x[start:stop] along `axis`) as a numpy array: the default `fetch` of the writers."""
  if start is None:
    return np.asarray(x)
  return np.asarray(x[(slice(None),) * axis + (slice(start, stop),)])


def backbone_to_tensors(bparams: dict, c, prefix: str = "", fetch: Callable = host_slice, chunked: bool = False
                        ) -> Iterator[tuple[str, Any]]:
  """Yields (name, array) for a backbone params dict; prefix '' (NextStep-1) or 'model.' (Qwen2.5).
  `fetch(x, start, stop, axis)` brings an array or a slice of it (one layer of a stacked leaf) to the host
  (``host_slice`` by default); `chunked`:
  the [vocab, hidden] tensors come as ``RowChunks`` (fetched a piece of rows at a time)."""
  emb, lay, norm, head = _backbone_names(prefix)
  vocab_rows = list(_chunks(range(c.vocab_size), c.hidden_size * 4))
  if chunked:
    table = bparams["embed_tokens"]
    yield emb, RowChunks((c.vocab_size, c.hidden_size), (fetch(table, a, b) for a, b in vocab_rows))
  else:
    yield emb, fetch(bparams["embed_tokens"])
  layers = bparams["layers"]
  for i in range(c.num_layers):
    for ours, suffix, to_ckpt, _ in BACKBONE_LAYER_MAP:
      yield f"{lay}.{i}.{suffix}", np.ascontiguousarray(to_ckpt(fetch(layers[ours], i, i + 1)[0], c))
  yield norm, fetch(bparams["final_norm_scale"])
  if chunked:
    kernel = bparams["lm_head_kernel"]
    yield head, RowChunks((c.vocab_size, c.hidden_size), (fetch(kernel, a, b, 1).T for a, b in vocab_rows))
  else:
    yield head, np.ascontiguousarray(fetch(bparams["lm_head_kernel"]).T)


def backbone_from_tensors(get: Callable[[str], np.ndarray], c, prefix: str = "") -> dict:
  """Builds a backbone params dict from a tensor getter (raises KeyError naming a missing tensor)."""
  emb, lay, norm, head = _backbone_names(prefix)
  layers = {}
  for ours, suffix, _, from_ckpt in BACKBONE_LAYER_MAP:
    layers[ours] = np.stack([from_ckpt(get(f"{lay}.{i}.{suffix}"), c) for i in range(c.num_layers)])
  return {"embed_tokens": get(emb), "layers": layers, "final_norm_scale": get(norm),
          "lm_head_kernel": np.ascontiguousarray(get(head).T)}


def nextstep_to_tensors(params: dict, cfg, fetch: Callable = host_slice, chunked: bool = False
                        ) -> Iterator[tuple[str, Any]]:
  """All NextStep-1 tensors (SPEC §9 names) from the model's pure params dict; cfg is NextStepConfig.
  One layer of a stacked leaf is fetched at a time (`fetch` and `chunked` as in ``backbone_to_tensors``)."""
  yield from backbone_to_tensors(params["backbone"], cfg.backbone, prefix="", fetch=fetch, chunked=chunked)
  for path, (name, (to_ckpt, _)) in NEXTSTEP_TOP_MAP.items():
    x = params
    for p in path:
      x = x[p]
    yield name, np.ascontiguousarray(to_ckpt(fetch(x)))
  for i in range(cfg.head.num_layers):
    for ours, (suffix, (to_ckpt, _)) in HEAD_BLOCK_MAP.items():
      yield f"image_head.net.res_blocks.{i}.{suffix}", np.ascontiguousarray(
          to_ckpt(fetch(params["head"][ours], i, i + 1)[0]))


def nextstep_from_tensors(get: Callable[[str], np.ndarray], cfg) -> dict:
  """The model's pure params dict from NextStep-1 tensors."""
  params: dict = {"backbone": backbone_from_tensors(get, cfg.backbone, prefix=""), "head": {}}
  for path, (name, (_, from_ckpt)) in NEXTSTEP_TOP_MAP.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(from_ckpt(get(name)))
  for ours, (suffix, (_, from_ckpt)) in HEAD_BLOCK_MAP.items():
    params["head"][ours] = np.stack([
        from_ckpt(get(f"image_head.net.res_blocks.{i}.{suffix}")) for i in range(cfg.head.num_layers)])
  return params


CHUNK_BYTES = 8 << 20  # the vocabulary-sized tensors are read and written in pieces of about this size


def _chunks(rows: range, row_bytes: int) -> Iterator[tuple[int, int]]:
  step = max(1, CHUNK_BYTES // max(row_bytes, 1))
  for a in range(rows.start, rows.stop, step):
    yield a, min(a + step, rows.stop)


def _piece(x: np.ndarray, index: tuple) -> np.ndarray:
  """``x[index]`` holding only its own elements: a slice of part of `x` is copied out, since numpy's view would
  keep the whole of `x` alive (a stacked reader holding every layer's whole tensor until it stacks them, or a
  device shard aliasing the whole tensor it was cut from)."""
  x = np.asarray(x)
  part = x[index]
  return np.array(part, copy=True) if part.size != x.size else part


def backbone_leaf_readers(get: Callable[[str], np.ndarray], c, prefix: str = "",
                          get_rows: Callable[[str, int, int], np.ndarray] | None = None
                          ) -> dict[tuple[str, ...], Callable]:
  """{backbone params path: read(index)} for every leaf of a backbone's pure params dict, from checkpoint
  tensors named with `prefix` ('' NextStep-1, 'model.' Qwen2.5); ``nextstep_leaf_readers`` has the contract."""
  emb, lay, norm, head = _backbone_names(prefix)
  out: dict[tuple[str, ...], Callable] = {}
  for ours, suffix, _, from_ckpt in BACKBONE_LAYER_MAP:
    out[("layers", ours)] = _stacked(c.num_layers, lambda i, s=suffix, f=from_ckpt: f(get(f"{lay}.{i}.{s}"), c))
  row_bytes = c.hidden_size * 4
  if get_rows is None:
    out[("embed_tokens",)] = lambda index: _piece(get(emb), index)
    out[("lm_head_kernel",)] = lambda index: _piece(get(head).T, index)
  else:  # [vocab, hidden] tensors: only the rows the slice needs, a piece at a time
    def embed(index):
      rows = range(c.vocab_size)[index[0]]
      return np.concatenate([_piece(get_rows(emb, a, b), (slice(None), index[1])) for a, b in _chunks(rows, row_bytes)],
                            axis=0)

    def lm_head(index):  # our (hidden, vocab) kernel is the [vocab, hidden] weight transposed
      rows = range(c.vocab_size)[index[1]]
      return np.concatenate([_piece(get_rows(head, a, b), (slice(None), index[0])).T
                             for a, b in _chunks(rows, row_bytes)], axis=1)

    out[("embed_tokens",)] = embed
    out[("lm_head_kernel",)] = lm_head
  out[("final_norm_scale",)] = lambda index: _piece(get(norm), index)
  return out


def _stacked(count: int, layer: Callable[[int], np.ndarray]) -> Callable:
  """read(index) of a stacked leaf whose layer i is ``layer(i)``: one layer's tensor at a time, its slice kept."""
  def read(index):
    rows = range(count)[index[0]]
    return np.stack([_piece(layer(i), index[1:]) for i in rows])
  return read


def nextstep_leaf_readers(get: Callable[[str], np.ndarray], cfg,
                          get_rows: Callable[[str, int, int], np.ndarray] | None = None
                          ) -> dict[tuple[str, ...], Callable]:
  """{params path: read(index)} for every leaf of the model's pure params dict: ``read`` returns
  ``leaf[index]`` (a tuple of slices over the leaf's shape) reading only the checkpoint tensors the slice
  needs: a stacked leaf (layers or head blocks first) reads one layer's tensor at a time, so a reader never
  holds more than the slice and one layer (with `get_rows(name, start, stop)`, the vocabulary-sized tensors
  are read a piece of rows at a time). What ``nextstep_from_tensors`` builds whole, piece by piece."""
  out = {("backbone",) + path: read for path, read in backbone_leaf_readers(get, cfg.backbone, "", get_rows).items()}
  for path, (name, (_, from_ckpt)) in NEXTSTEP_TOP_MAP.items():
    out[path] = lambda index, n=name, f=from_ckpt: _piece(f(get(n)), index)
  for ours, (suffix, (_, from_ckpt)) in HEAD_BLOCK_MAP.items():
    out[("head", ours)] = _stacked(
        cfg.head.num_layers, lambda i, s=suffix, f=from_ckpt: f(get(f"image_head.net.res_blocks.{i}.{s}")))
  return out
