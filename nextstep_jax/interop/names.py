"""Name and layout maps between this project's parameters and Hugging Face / PyTorch checkpoints.

Our parameters (``nnx.to_pure_dict`` of the model state) use stacked layers and (in, out) kernels;
checkpoints use one tensor per layer and PyTorch ``[out, in]`` Linear weights. Each map entry knows how to
go both ways, so export followed by import is exact.

Names follow SPEC §9: NextStep-1 checkpoints have no ``model.`` prefix; Qwen2.5 checkpoints
(``Qwen2ForCausalLM``) name the same backbone layers under ``model.`` with ``lm_head.weight`` outside it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

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


def backbone_to_tensors(bparams: dict, c, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for a backbone params dict; prefix '' (NextStep-1) or 'model.' (Qwen2.5)."""
  emb, lay, norm, head = _backbone_names(prefix)
  yield emb, np.asarray(bparams["embed_tokens"])
  layers = bparams["layers"]
  for i in range(c.num_layers):
    for ours, suffix, to_ckpt, _ in BACKBONE_LAYER_MAP:
      yield f"{lay}.{i}.{suffix}", np.ascontiguousarray(to_ckpt(np.asarray(layers[ours][i]), c))
  yield norm, np.asarray(bparams["final_norm_scale"])
  yield head, np.ascontiguousarray(np.asarray(bparams["lm_head_kernel"]).T)


def backbone_from_tensors(get: Callable[[str], np.ndarray], c, prefix: str = "") -> dict:
  """Builds a backbone params dict from a tensor getter (raises KeyError naming a missing tensor)."""
  emb, lay, norm, head = _backbone_names(prefix)
  layers = {}
  for ours, suffix, _, from_ckpt in BACKBONE_LAYER_MAP:
    layers[ours] = np.stack([from_ckpt(get(f"{lay}.{i}.{suffix}"), c) for i in range(c.num_layers)])
  return {"embed_tokens": get(emb), "layers": layers, "final_norm_scale": get(norm),
          "lm_head_kernel": np.ascontiguousarray(get(head).T)}


def nextstep_to_tensors(params: dict, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """All NextStep-1 tensors (SPEC §9 names) from the model's pure params dict; cfg is NextStepConfig."""
  yield from backbone_to_tensors(params["backbone"], cfg.backbone, prefix="")
  for path, (name, (to_ckpt, _)) in NEXTSTEP_TOP_MAP.items():
    x = params
    for p in path:
      x = x[p]
    yield name, np.ascontiguousarray(to_ckpt(np.asarray(x)))
  for i in range(cfg.head.num_layers):
    for ours, (suffix, (to_ckpt, _)) in HEAD_BLOCK_MAP.items():
      yield f"image_head.net.res_blocks.{i}.{suffix}", np.ascontiguousarray(
          to_ckpt(np.asarray(params["head"][ours][i])))


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
