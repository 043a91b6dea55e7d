"""Hugging Face directories: NextStep-1 export/import and Qwen2.5 backbone import, safetensors only.

A NextStep-1 directory (SPEC §9) holds
  model-0000i-of-0000n.safetensors   the tensors, NextStep-1 names (no ``model.`` prefix), [out, in]
  model.safetensors.index.json       {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
  config.json                        the Qwen2/Llama fields + latent_size, latent_patch_size,
                                     latent_channels, boi, eoi, image_placeholder_id, lm_loss_weight,
                                     im_loss_weight, fm_head_dim, fm_head_layers, fm_head_batch_mul
  tokenizer files, vae/              when given
Names and layouts come from ``interop/names.py`` (``nextstep_to_tensors`` / ``nextstep_from_tensors``).

The safetensors files and the sharded directory are read and written by ``interop/safetensors_io.py``
(no torch, nothing ever unpickled: a directory with only ``pytorch_model.bin`` is refused; a tensor with
NaN/Inf values is refused as it is read, naming the file and the tensor).

Qwen2.5 (``Qwen2ForCausalLM``) directories name the backbone under ``model.``; every size is read from
their config.json (``qwen2_config``); ``import_qwen2_backbone`` returns the backbone's params.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
from absl import logging
import numpy as np
from flax import nnx

from nextstep_jax.interop import names, streamed
from nextstep_jax.interop import stored
from nextstep_jax.interop import vae as vae_interop
from nextstep_jax.interop.params import load_pure_params
from nextstep_jax.interop.safetensors_io import (DEFAULT_SHARD_BYTES, CheckpointError, TensorDir, _read_json,
                                                 load_safetensors, save_sharded)
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import nextstep as ns

CONFIG_FILE = "config.json"
VAE_DIR = "vae"
_EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                  "float16": np.dtype(np.float16)}


# ---------------------------------------------------------------------------------------------
# Names and shapes (abstract: no weights needed)
# ---------------------------------------------------------------------------------------------

def checkpoint_shapes(cfg: ns.NextStepConfig) -> dict[str, tuple[int, ...]]:
  """Every NextStep-1 tensor name and its checkpoint shape, in ``nextstep_to_tensors`` order, computed
  from abstract parameters (nothing is allocated, even for the 14B preset)."""
  abstract = nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return _shapes_from_abstract(params, cfg)


def _shapes_from_abstract(params: dict, cfg: ns.NextStepConfig) -> dict[str, tuple[int, ...]]:
  shape_of = lambda fn, x: tuple(jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape)
  c = cfg.backbone
  bp = params["backbone"]
  out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": tuple(bp["embed_tokens"].shape)}
  for i in range(c.num_layers):
    for ours, suffix, to_ckpt, _ in names.BACKBONE_LAYER_MAP:
      x = bp["layers"][ours]
      out[f"layers.{i}.{suffix}"] = shape_of(lambda a: to_ckpt(a, c), jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
  out["norm.weight"] = tuple(bp["final_norm_scale"].shape)
  out["lm_head.weight"] = tuple(bp["lm_head_kernel"].shape[::-1])
  for path, (name, (to_ckpt, _)) in names.NEXTSTEP_TOP_MAP.items():
    x = params
    for p in path:
      x = x[p]
    out[name] = shape_of(to_ckpt, x)
  for i in range(cfg.head.num_layers):
    for ours, (suffix, (to_ckpt, _)) in names.HEAD_BLOCK_MAP.items():
      x = params["head"][ours]
      out[f"image_head.net.res_blocks.{i}.{suffix}"] = shape_of(to_ckpt, jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
  return out


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageMeta:
  """What config.json says about images and special tokens beyond the model's own config."""
  latent_channels: int
  latent_patch_size: int
  latent_size: int | None = None
  boi: int | None = None
  eoi: int | None = None
  image_placeholder_id: int | None = None
  image_area_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  base_image_grid_size: int | None = None  # NextStep-1.1's field (the generation table's side)
  gen_pos_grid: int | None = None          # side of the gen_pos_embed table the directory carried
  qkv_bias: bool = True                    # config.json attention_bias (False: zero q/k/v biases)
  tied_embeddings: bool = False            # config.json tie_word_embeddings (no lm_head.weight)
  # The imported config.json as read (export writes back its other fields); not part of equality.
  source: dict | None = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def from_tokenizer(cls, tokenizer: Any, latent_channels: int, latent_patch_size: int,
                     latent_size: int) -> "ImageMeta":
    """Token ids from a ``nextstep_jax.data.tokenizer.Tokenizer`` (or anything with the same fields)."""
    return cls(latent_channels=latent_channels, latent_patch_size=latent_patch_size, latent_size=latent_size,
               boi=tokenizer.boi_id, eoi=tokenizer.eoi_id, image_placeholder_id=tokenizer.placeholder_id,
               image_area_id=tokenizer.area_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)

  @classmethod
  def from_config(cls, config: Any, tokenizer: Any | None = None) -> "ImageMeta":
    """From the experiment config (image.*, data.image_size) and optionally its tokenizer."""
    img = config.image
    latent_size = int(config.data.image_size) // int(img.vae_factor)
    if tokenizer is not None:
      return cls.from_tokenizer(tokenizer, int(img.latent_channels), int(img.patch_size), latent_size)
    return cls(int(img.latent_channels), int(img.patch_size), latent_size)


GEN_POS_EMBED = "gen_pos_embed"
GEN_POS_GRID_V1 = 32  # the NextStep-1 release registers a 32 x 32 table whatever the image size


def gen_pos_table(hidden: int, grid: int) -> np.ndarray:
  """The 2-D sin-cos table the official model registers as ``gen_pos_embed`` (1, grid*grid, hidden), fp32.

  Position n = r * grid + c (raster order); its first hidden/2 values encode the column c, the last
  hidden/2 the row r, each as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (hidden / 4)),
  k < hidden / 4 (MAE's 2-D sin-cos embedding, computed in float64 as the release does, stored fp32).
  """
  if hidden % 4:
    raise ValueError(f"gen_pos_embed needs hidden_size divisible by 4, got {hidden}")
  quarter = hidden // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  row, col = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)

  def one_axis(pos: np.ndarray) -> np.ndarray:
    angle = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

  return np.concatenate([one_axis(col), one_axis(row)], axis=1).astype(np.float32)[None]


def check_gen_pos_embed(table: np.ndarray, hidden: int, where: str) -> int:
  """The grid side of a stored ``gen_pos_embed``, after checking it is the 2-D sin-cos table in its storage
  dtype, bit for bit (so export writes back the same bytes); CheckpointError naming the file otherwise."""
  shape = tuple(table.shape)
  n = shape[1] if len(shape) == 3 and shape[0] == 1 and shape[2] == hidden else -1
  grid = int(round(math.sqrt(n))) if n > 0 else -1
  if grid < 1 or grid * grid != n:
    raise CheckpointError(f"{where}: tensor {GEN_POS_EMBED} has shape {list(shape)}; the official model "
                          f"stores (1, grid*grid, hidden_size={hidden})")
  want = gen_pos_table(hidden, grid).astype(table.dtype)
  if not np.array_equal(np.asarray(table).view(np.uint8), want.view(np.uint8)):
    diff = float(np.max(np.abs(np.asarray(table, np.float32) - want.astype(np.float32))))
    raise CheckpointError(f"{where}: tensor {GEN_POS_EMBED} is not the 2-D sin-cos table of a {grid} x {grid} "
                          f"grid (max |diff| {diff:.3g}); the official model registers exactly that table, so "
                          "this checkpoint was edited")
  return grid


# Fields of the official NextStepConfig (Llama-style: the q/k/v biases are `attention_bias`, the o_proj
# bias `o_attention_bias`) that the project's model fixes: config.json must say what the model does.
_OFFICIAL_FIXED = {"o_attention_bias": False, "mlp_bias": False, "use_gen_pos_embed": False}


def hf_config(cfg: ns.NextStepConfig, meta: ImageMeta, dtype: str = "float32",
              max_position_embeddings: int = 32768) -> dict:
  """config.json for a NextStep-1 directory: the Qwen2/Llama fields plus the NextStep fields (SPEC §9) that
  the official ``NextStepConfig`` reads (``attention_bias`` true for the q/k/v biases, ``o_attention_bias``
  and ``mlp_bias`` false, ``use_gen_pos_embed`` false). A directory imported from the official layout
  (``meta.source``) keeps its other fields as they were."""
  c, h = cfg.backbone, cfg.head
  if meta.latent_channels * meta.latent_patch_size**2 != cfg.token_dim:
    raise ValueError(f"latent_channels={meta.latent_channels} x latent_patch_size={meta.latent_patch_size}^2 "
                     f"does not give the model's token_dim={cfg.token_dim}")
  out = dict(meta.source or {})
  if meta.source is None:
    out.update({"architectures": ["NextStep"], "model_type": "nextstep", "hidden_act": "silu",
                "max_position_embeddings": max_position_embeddings, "rope_scaling": None,
                "attention_dropout": 0.0, "initializer_range": 0.02, "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": c.num_layers, "use_cache": True,
                "bos_token_id": None, "vae_name_or_path": VAE_DIR})
  out.update({
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "tie_word_embeddings": False, "torch_dtype": dtype, "dtype": dtype,
      "attention_bias": True, **_OFFICIAL_FIXED,
      "eos_token_id": meta.eos_token_id, "pad_token_id": meta.pad_token_id,
      "latent_size": meta.latent_size, "latent_patch_size": meta.latent_patch_size,
      "latent_channels": meta.latent_channels, "boi": meta.boi, "eoi": meta.eoi,
      "image_placeholder_id": meta.image_placeholder_id, "image_area_id": meta.image_area_id,
      "lm_loss_weight": cfg.ce_weight, "im_loss_weight": cfg.fm_weight, "fm_head_dim": h.dim,
      "fm_head_layers": h.num_layers, "fm_head_batch_mul": h.batch_mul, "token_norm": cfg.token_norm,
  })
  if meta.base_image_grid_size is not None:
    out["base_image_grid_size"] = meta.base_image_grid_size
  if "rope_parameters" in out:  # transformers >= 5 style: theta lives there
    out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": c.rope_theta}
  return out


def _field(d: Mapping, key: str, source: str, kind: type, default: Any = dataclasses.MISSING,
           positive: bool = False) -> Any:
  """d[key] checked to be a `kind` (int, float or bool); `default` when absent or null."""
  v = d.get(key)
  if v is None:
    if default is dataclasses.MISSING:
      raise CheckpointError(f"{source}: config.json has no field {key!r}")
    return default
  if kind is bool:
    ok = isinstance(v, bool)
  else:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
  if not ok:
    raise CheckpointError(f"{source}: config.json field {key!r} = {v!r} is not a {kind.__name__}")
  v = kind(v)
  if positive and v <= 0:
    raise CheckpointError(f"{source}: config.json field {key!r} = {v!r} must be positive")
  return v


def _backbone_fields(d: Mapping, source: str) -> dict:
  """Backbone sizes of a Qwen2/NextStep config.json (Qwen2 defaults where transformers has them)."""
  if not isinstance(d, Mapping):
    raise CheckpointError(f"{source}: config.json is not a JSON object")
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{source}: config.json hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
  rope = d.get("rope_parameters") or {}
  if not isinstance(rope, Mapping):
    raise CheckpointError(f"{source}: config.json field 'rope_parameters' is not an object")
  scaling = d.get("rope_scaling")
  rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
  if rope_type != "default":
    raise CheckpointError(f"{source}: config.json asks for RoPE scaling {rope_type!r}; only plain RoPE is supported")
  if d.get("use_sliding_window"):
    raise CheckpointError(f"{source}: config.json use_sliding_window=true is not supported")
  theta_src = rope if "rope_theta" in rope else d
  f = dict(
      vocab_size=_field(d, "vocab_size", source, int, positive=True),
      hidden_size=_field(d, "hidden_size", source, int, positive=True),
      num_layers=_field(d, "num_hidden_layers", source, int, positive=True),
      num_heads=_field(d, "num_attention_heads", source, int, positive=True),
      num_kv_heads=_field(d, "num_key_value_heads", source, int, positive=True),
      intermediate_size=_field(d, "intermediate_size", source, int, positive=True),
      rms_norm_eps=_field(d, "rms_norm_eps", source, float, default=1e-6, positive=True),
      rope_theta=_field(theta_src, "rope_theta", source, float, default=10000.0, positive=True),
  )
  if "head_dim" in d and d["head_dim"] is not None:
    f["head_dim"] = _field(d, "head_dim", source, int, positive=True)
  else:
    if f["hidden_size"] % f["num_heads"]:
      raise CheckpointError(f"{source}: config.json hidden_size={f['hidden_size']} is not divisible by "
                            f"num_attention_heads={f['num_heads']} and there is no head_dim")
    f["head_dim"] = f["hidden_size"] // f["num_heads"]
  if f["num_heads"] % f["num_kv_heads"]:
    raise CheckpointError(f"{source}: config.json num_attention_heads={f['num_heads']} is not divisible by "
                          f"num_key_value_heads={f['num_kv_heads']}")
  return f


_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "document_mask")
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size")


def _model_getter(base: Any) -> Callable[[str], Any]:
  """A getter over the model part of an experiment config, a config.model, a dict or a BackboneConfig."""
  if not isinstance(base, bb.BackboneConfig) and hasattr(base, "model"):
    base = base.model
  if hasattr(base, "get"):
    return lambda k: base.get(k)
  return lambda k: getattr(base, k, None)


def _runtime(base: Any) -> dict:
  """Non-size backbone fields (dtype, remat, attention, ...) of `base` (None: the defaults)."""
  if base is None:
    return {}
  get = _model_getter(base)
  return {k: get(k) for k in _RUNTIME_FIELDS if get(k) is not None}


def _checked_backbone(fields: dict, where: Any) -> bb.BackboneConfig:
  """A validated BackboneConfig; a bad field raises CheckpointError naming `where` (the file)."""
  try:
    c = bb.BackboneConfig(**fields)
    c.validate()
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {e}") from e
  return c


def _official_flags(d: Mapping, source: str) -> tuple[bool, bool]:
  """(qkv_bias, tied_embeddings) of a NextStep config.json; CheckpointError for a layout the model lacks."""
  # Llama-style: the q/k/v biases exist when attention_bias says so (absent: false, the LlamaConfig default);
  # missing bias tensors of a config that does not ask for them are zeros (load_nextstep_params).
  qkv = _field(d, "attention_bias", source, bool, default=False)
  if _field(d, "mlp_bias", source, bool, default=False):
    raise CheckpointError(f"{source}: config.json mlp_bias=true: the SwiGLU MLP here has no biases")
  if _field(d, "use_gen_pos_embed", source, bool, default=False):
    raise CheckpointError(f"{source}: config.json use_gen_pos_embed=true: adding the 2-D generation table to "
                          "the sampler's condition is not supported (the released checkpoints leave it off)")
  if d.get("use_mlp_before_lm_head") or d.get("attention_use_qk_norm"):
    raise CheckpointError(f"{source}: config.json asks for use_mlp_before_lm_head / attention_use_qk_norm, "
                          "which the released NextStep models do not use and this project does not implement")
  return qkv, _field(d, "tie_word_embeddings", source, bool, default=False)


def config_from_hf(d: Mapping, source: str = "config.json", *, runtime: Any = None
                   ) -> tuple[ns.NextStepConfig, ImageMeta]:
  """(NextStepConfig, ImageMeta) from a NextStep config.json dict: ours, or the official release's of
  NextStep-1 and NextStep-1.1 (``latent_size`` 32 or 64, ``base_image_grid_size``, ``attention_bias``,
  ``mlp_bias``, ``use_gen_pos_embed``, ...; a bias on o_proj is refused from the tensors themselves). `runtime`: a BackboneConfig, an experiment config or a
  dict giving dtype/param_dtype/remat/attention/document_mask (defaults otherwise). ``token_norm`` (ours)
  defaults to off: the official model feeds its VAE's latents as they are (the VAE's encoder norm is the
  only one)."""
  f = _backbone_fields(d, source)
  f.update(_runtime(runtime))
  backbone = _checked_backbone(f, source)
  qkv_bias, tied = _official_flags(d, source)
  channels = _field(d, "latent_channels", source, int, positive=True)
  patch = _field(d, "latent_patch_size", source, int, positive=True)
  token_dim = channels * patch**2
  head = fm_head.HeadConfig(dim=_field(d, "fm_head_dim", source, int, positive=True),
                            num_layers=_field(d, "fm_head_layers", source, int, positive=True),
                            cond_dim=backbone.hidden_size, token_dim=token_dim,
                            batch_mul=_field(d, "fm_head_batch_mul", source, int, default=4, positive=True),
                            dtype=backbone.dtype, param_dtype=backbone.param_dtype, remat=backbone.remat)
  if _field(d, "fm_head_mlp_ratio", source, float, default=1.0) != 1.0:
    raise CheckpointError(f"{source}: config.json fm_head_mlp_ratio={d['fm_head_mlp_ratio']}: the head's blocks "
                          "here are dim -> dim (ratio 1)")
  cfg = ns.NextStepConfig(backbone=backbone, head=head, token_dim=token_dim,
                          token_norm=_field(d, "token_norm", source, bool, default=False),
                          ce_weight=_field(d, "lm_loss_weight", source, float, default=0.01),
                          fm_weight=_field(d, "im_loss_weight", source, float, default=1.0))
  opt = lambda k: _field(d, k, source, int, default=None)
  meta = ImageMeta(latent_channels=channels, latent_patch_size=patch,
                   latent_size=opt("latent_size"), boi=opt("boi"), eoi=opt("eoi"),
                   image_placeholder_id=opt("image_placeholder_id"), image_area_id=opt("image_area_id"),
                   eos_token_id=_token_id(d, "eos_token_id", source), pad_token_id=_token_id(d, "pad_token_id", source),
                   base_image_grid_size=opt("base_image_grid_size"), qkv_bias=qkv_bias, tied_embeddings=tied,
                   source=dict(d))
  return cfg, meta


def _token_id(d: Mapping, key: str, source: str) -> int | None:
  v = d.get(key)
  if isinstance(v, list):  # transformers allows several EOS ids; keep the first
    v = v[0] if v else None
  return None if v is None else _field({key: v}, key, source, int)


# ---------------------------------------------------------------------------------------------
# NextStep-1 export / import
# ---------------------------------------------------------------------------------------------

def _params_of(model_or_params: Any) -> dict:
  if isinstance(model_or_params, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
  return model_or_params


def export_nextstep(model_or_params: Any, cfg: ns.NextStepConfig, out_dir: str, meta: ImageMeta, *,
                    dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    tokenizer: Any = None, vae: Any = None, fetch: Callable | None = None) -> dict:
  """Writes a NextStep-1 Hugging Face directory. Returns the shard index.

  model_or_params: a NextStep module or its pure params dict (numpy or jax arrays, possibly sharded, over
  several processes too: each tensor, one layer of a stacked leaf at a time, is fetched as it is written,
  so the host holds one tensor beside its own shards; process 0 writes). dtype: storage dtype (float32 keeps export -> import
  bitwise; the release stores bfloat16). tokenizer: a directory/file to copy, or an object with
  ``save(dir)`` (``nextstep_jax.data.tokenizer.Tokenizer``) or ``save_pretrained(dir)``. vae: a directory
  (copied to ``vae/``), a file (copied into ``vae/``), or an ``AutoencoderKL`` (``interop.vae.export_vae``).
  fetch: how process 0 alone brings each tensor (or a slice of it, ``names.host_slice``'s contract) to the host,
  e.g. ``stored.StoredParams.fetch`` reading a checkpoint piece by piece (the leaves then need only ``shape`` and
  ``dtype``); the other processes read nothing. Default: the leaves are arrays, gathered on every process.
  """
  if dtype not in _EXPORT_DTYPES:
    raise ValueError(f"export dtype {dtype!r}; expected one of {sorted(_EXPORT_DTYPES)}")
  if max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
  config = hf_config(cfg, meta, dtype)
  params = _params_of(model_or_params)
  store = _EXPORT_DTYPES[dtype]
  shapes = _shapes_from_abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params), cfg)
  entries = {k: (s, store) for k, s in shapes.items()}
  writer = jax.process_index() == 0
  tensors = names.nextstep_to_tensors(params, cfg, fetch=fetch or _fetch_one, chunked=True)
  if fetch is not None and not writer:
    tensors = iter(())  # process 0 reads and writes everything alone
  grid = meta.gen_pos_grid if meta.source is not None else (meta.gen_pos_grid or GEN_POS_GRID_V1)
  if grid:  # the official model's persistent buffer (see gen_pos_table)
    table = gen_pos_table(cfg.backbone.hidden_size, grid)
    entries[GEN_POS_EMBED] = (table.shape, store)
    tensors = itertools.chain(tensors, [(GEN_POS_EMBED, table)])
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  index = save_sharded(out_dir, entries, tensors, max_shard_bytes, write=writer)
  if not writer:
    return index
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    _copy_tokenizer(tokenizer, out_dir)
  if vae is not None:
    _copy_vae(vae, os.path.join(out_dir, VAE_DIR))
  return index


def _fetch_one(x: Any, start: int | None = None, stop: int | None = None, axis: int = 0) -> np.ndarray:
  """`x` or x[start:stop] along `axis` on the host (``names.host_slice``'s contract). A sharded jax array is
  sliced and gathered by one compiled program per shape (the slice start is traced), replicated onto every
  device, so each process receives just that slice (only process 0 writes it)."""
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return names.host_slice(x, start, stop, axis)
  size = x.shape[axis] if start is None else stop - start
  out = _gather_fn(x.shape, x.dtype, x.sharding, size, axis)(x, jnp.int32(0 if start is None else start))
  return np.asarray(out.addressable_data(0))


@functools.lru_cache(maxsize=None)
def _gather_fn(shape, dtype, sharding, size: int, axis: int):
  del shape, dtype  # part of the cache key
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, axis), out_shardings=replicated)


def _copy_tokenizer(tokenizer: Any, out_dir: str) -> None:
  if isinstance(tokenizer, (str, os.PathLike)):
    src = os.fspath(tokenizer)
    if os.path.isdir(src):
      for name in sorted(os.listdir(src)):
        if os.path.isfile(os.path.join(src, name)):
          shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))
    elif os.path.isfile(src):
      shutil.copy2(src, os.path.join(out_dir, os.path.basename(src)))
    else:
      raise FileNotFoundError(f"tokenizer path {src} does not exist")
  elif hasattr(tokenizer, "save"):
    tokenizer.save(out_dir)
  elif hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(out_dir)
  else:
    raise TypeError(f"cannot save tokenizer {tokenizer!r}: give a path or an object with save(dir)")


def _copy_vae(vae: Any, vae_dir: str) -> None:
  if isinstance(vae, (str, os.PathLike)):
    src = os.fspath(vae)
    if os.path.isdir(src):
      shutil.copytree(src, vae_dir, dirs_exist_ok=True)
    elif os.path.isfile(src):
      os.makedirs(vae_dir, exist_ok=True)
      shutil.copy2(src, os.path.join(vae_dir, os.path.basename(src)))
    else:
      raise FileNotFoundError(f"VAE path {src} does not exist")
  elif isinstance(vae, nnx.Module):
    vae_interop.export_vae(vae, vae_dir)
  else:
    raise TypeError(f"cannot save VAE {vae!r}: give a path or an AutoencoderKL")
  _official_vae_pickle(vae_dir)


def _official_vae_pickle(vae_dir: str) -> None:
  """``vae/checkpoint.pt`` beside our safetensors: the release's VAE loader reads only that file (a plain
  state dict, written with ``torch.save``). Without torch the directory keeps the safetensors alone (our
  importer reads it) and a warning says so."""
  pickle, src = os.path.join(vae_dir, "checkpoint.pt"), os.path.join(vae_dir, vae_interop.CHECKPOINT_FILE)
  if os.path.exists(pickle) or not os.path.exists(src):
    return
  try:
    import torch  # pylint: disable=import-outside-toplevel  # optional: only to write the release's pickle
  except ImportError:
    logging.warning("%s: torch is not installed, so vae/checkpoint.pt (what the official VAE loader reads) "
                    "was not written; the safetensors file holds the same weights", vae_dir)
    return
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in load_safetensors(src).items()}
  tmp = pickle + ".partial"
  torch.save(tensors, tmp)
  os.replace(tmp, pickle)


def read_nextstep_config(directory: str, runtime: Any = None) -> tuple[ns.NextStepConfig, ImageMeta]:
  """config.json of a NextStep-1 directory -> (NextStepConfig, ImageMeta); the ImageMeta also says which
  optional tensors the directory carries (``gen_pos_grid``: the side of its checked ``gen_pos_embed``)."""
  path = os.path.join(directory, CONFIG_FILE)
  cfg, meta = config_from_hf(_read_json(path), path, runtime=runtime)
  if os.path.isdir(directory) and GEN_POS_EMBED in (tensors := TensorDir(directory)):
    grid = check_gen_pos_embed(tensors.get(GEN_POS_EMBED), cfg.backbone.hidden_size, tensors.file_of(GEN_POS_EMBED))
    meta = dataclasses.replace(meta, gen_pos_grid=grid)
  return cfg, meta


def load_nextstep_params(directory: str, cfg: ns.NextStepConfig, meta: ImageMeta | None = None) -> dict:
  """The model's pure params dict (numpy) from a NextStep-1 directory (ours or the official release's),
  every tensor checked against the shapes `cfg` implies and, as it is read, for NaN/Inf (errors name the
  file and tensor). Every tensor of the directory is accounted for: ``gen_pos_embed`` is checked against
  the 2-D sin-cos table it must equal (``check_gen_pos_embed``; export writes it back); without
  ``attention_bias`` the q/k/v biases are zeros (the same function); a tied checkpoint's lm_head is
  embed_tokens."""
  meta = meta if meta is not None else read_nextstep_config(directory)[1]
  tensors = TensorDir(directory)
  shapes = checkpoint_shapes(cfg)
  check_tensor_names(directory, tensors, shapes, cfg, meta)
  get = _tensor_getter(tensors, shapes, meta)
  return names.nextstep_from_tensors(get, cfg)


def check_tensor_names(directory: str, tensors: TensorDir, shapes: dict, cfg: ns.NextStepConfig,
                       meta: ImageMeta) -> None:
  """Every tensor of the directory accounted for (see ``load_nextstep_params``); CheckpointError naming the
  first that is not, before anything is read."""
  o_bias = sorted(n for n in tensors.names() if n.endswith("self_attn.o_proj.bias"))
  if o_bias:
    raise CheckpointError(f"{tensors.file_of(o_bias[0])}: tensor {o_bias[0]}: a bias on o_proj; NextStep-1 and "
                          "this project's backbone have none")
  extra = sorted(set(tensors.names()) - set(shapes) - {GEN_POS_EMBED})
  if extra:
    raise CheckpointError(f"{directory}: unexpected tensors {extra[:8]}{'...' if len(extra) > 8 else ''} "
                          "(config.json does not describe them)")
  if GEN_POS_EMBED in tensors and meta.gen_pos_grid is None:  # read_nextstep_config checked it already
    check_gen_pos_embed(tensors.get(GEN_POS_EMBED), cfg.backbone.hidden_size, tensors.file_of(GEN_POS_EMBED))


def _zero_bias(name: str, meta: ImageMeta) -> bool:
  """A q/k/v bias the directory may leave out (no ``attention_bias``): zeros, as the release builds it."""
  return not meta.qkv_bias and re.fullmatch(r"layers\.\d+\.self_attn\.[qkv]_proj\.bias", name) is not None


def _stored_name(name: str, tensors: TensorDir, tied: bool, embed: str = "embed_tokens.weight") -> str:
  """The tensor to read for `name`: `embed` for a tied checkpoint's absent lm_head, else `name`."""
  return embed if tied and name == "lm_head.weight" and name not in tensors else name


def _tensor_getter(tensors: TensorDir, shapes: dict, meta: ImageMeta) -> Callable[[str], np.ndarray]:
  """name -> the checkpoint tensor (read as asked for, shape- and NaN-checked); zeros for absent q/k/v biases
  (no ``attention_bias``), embed_tokens for a tied lm_head."""
  def get(name: str) -> np.ndarray:
    if name not in tensors and _zero_bias(name, meta):
      return np.zeros(shapes[name], np.float32)
    return tensors.get(_stored_name(name, tensors, meta.tied_embeddings), shapes.get(name))
  return get


def check_tensor_shapes(tensors: TensorDir, shapes: dict, optional: Callable[[str], bool] = lambda name: False
                        ) -> None:
  """Every tensor of `shapes` present in the directory with its shape (unless `optional(name)` allows it to be
  absent), from the files' headers alone: CheckpointError naming the file and the first tensor that is not.
  What the streamed imports check before they write anything."""
  for name, shape in shapes.items():
    if name not in tensors:
      if optional(name):
        continue
      raise CheckpointError(f"{tensors.directory}: tensor {name} is missing (not in any safetensors file)")
    if tuple(tensors.shape(name)) != tuple(shape):
      raise CheckpointError(f"{tensors.file_of(name)}: tensor {name} has shape {list(tensors.shape(name))}, "
                            f"{CONFIG_FILE} implies {list(shape)}")


def streamed_tree(directory: str, target: Any, readers: dict, prefix: tuple[str, ...] = ()) -> dict:
  """`target`'s tree with a ``streamed.StreamedLeaf`` per leaf, reading through `readers` (keyed by the paths
  of `target`; `prefix`: where `target` sits in the model's params, for the names and the piece axes).
  `directory` names the source in errors."""
  flat = {path: leaf for path, leaf in flatten_paths(target)}
  if set(flat) != set(readers):
    raise CheckpointError(f"{directory}: the model's params and the checkpoint's tensors do not correspond "
                          f"({sorted(set(flat) ^ set(readers))[:4]})")
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = streamed.StreamedLeaf("/".join(prefix + path), leaf.shape, leaf.dtype, readers[path],
                                           axis=stored.piece_axis(prefix + path), sharding=leaf.sharding)
  return out


def nextstep_streamed_leaves(directory: str, cfg: ns.NextStepConfig, meta: ImageMeta, target: Any) -> dict:
  """The model's params as ``streamed.StreamedLeaf`` leaves (the tree of `target`, abstract params with
  the dtype to store and the sharding to record): each reads ``leaf[index]`` from the safetensors files
  alone (``names.nextstep_leaf_readers``: one layer's tensor, or a band of a vocabulary-sized one's rows),
  going along ``stored.piece_axis``. Nothing is read here; every tensor's presence and shape is checked
  (``check_tensor_names``, ``check_tensor_shapes``) before it returns, and each piece is checked for NaN/Inf
  as it is read (CheckpointError naming the file and the tensor)."""
  tensors = TensorDir(directory)
  shapes = checkpoint_shapes(cfg)
  check_tensor_names(directory, tensors, shapes, cfg, meta)
  check_tensor_shapes(tensors, shapes, lambda name: _zero_bias(name, meta) or _stored_name(
      name, tensors, meta.tied_embeddings) != name)
  get_rows = lambda n, a, b: tensors.get_rows(_stored_name(n, tensors, meta.tied_embeddings), a, b)
  readers = names.nextstep_leaf_readers(_tensor_getter(tensors, shapes, meta), cfg, get_rows=get_rows)
  return streamed_tree(directory, target, readers)


def flatten_paths(tree: Mapping, prefix: tuple = ()):
  """(path tuple, leaf) of every leaf of a nested dict, in its order."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from flatten_paths(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def load_nextstep(directory: str, runtime: Any = None) -> tuple[ns.NextStep, ImageMeta]:
  """(model, image meta) from a NextStep-1 directory: config.json -> NextStepConfig -> weights.

  The model is built abstractly and filled with the checkpoint (no random initialisation); params are
  cast to the config's param_dtype (float32 by default; `runtime` may set dtype/param_dtype/...).
  """
  cfg, meta = read_nextstep_config(directory, runtime)
  params = load_nextstep_params(directory, cfg, meta)
  model = nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))
  load_pure_params(model, params, source=directory)
  return model, meta


# ---------------------------------------------------------------------------------------------
# Qwen2.5 backbone import
# ---------------------------------------------------------------------------------------------

def qwen2_config(directory: str, base: Any = None) -> bb.BackboneConfig:
  """BackboneConfig of a Qwen2/Qwen2.5 directory: every size from its config.json; dtype, remat,
  attention and document_mask from `base` (an experiment config, config.model or BackboneConfig).
  When `base` carries sizes, they must agree with config.json (the error lists each mismatch)."""
  path = os.path.join(directory, CONFIG_FILE)
  d = _read_json(path)
  if not isinstance(d, Mapping):
    raise CheckpointError(f"{path}: config.json is not a JSON object")
  kind = d.get("model_type")
  if kind != "qwen2":
    raise CheckpointError(f"{path}: model_type is {kind!r}; import_qwen2_backbone reads Qwen2/Qwen2.5 "
                          "('qwen2') checkpoints")
  f = _backbone_fields(d, path)
  if base is not None:
    get = _model_getter(base)
    bad = [f"{k}: config {get(k)} vs checkpoint {f[k]}" for k in _SIZE_FIELDS
           if get(k) is not None and get(k) != f[k]]
    if bad:
      raise CheckpointError(f"{path}: the model config disagrees with the checkpoint: " + "; ".join(bad))
  f.update(_runtime(base))
  return _checked_backbone(f, path)


def _qwen2_shapes(c: bb.BackboneConfig) -> dict[str, tuple[int, ...]]:
  d, hq, hk, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
  per = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (hq, d), "self_attn.q_proj.bias": (hq,),
         "self_attn.k_proj.weight": (hk, d), "self_attn.k_proj.bias": (hk,), "self_attn.v_proj.weight": (hk, d),
         "self_attn.v_proj.bias": (hk,), "self_attn.o_proj.weight": (d, hq), "post_attention_layernorm.weight": (d,),
         "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
  out = {"model.embed_tokens.weight": (c.vocab_size, d)}
  out.update({f"model.layers.{i}.{k}": s for i in range(c.num_layers) for k, s in per.items()})
  out.update({"model.norm.weight": (d,), "lm_head.weight": (c.vocab_size, d)})
  return out


def _qwen2_readers(directory: str, config: Any) -> tuple[bb.BackboneConfig, dict]:
  """(BackboneConfig, {backbone params path: read(index)}) of a Qwen2ForCausalLM directory: sizes from its
  config.json (``qwen2_config``), every tensor's presence and shape checked from the headers, each piece
  checked for NaN/Inf as it is read; a tied checkpoint's lm_head is embed_tokens."""
  c = qwen2_config(directory, config)
  tied = bool(_read_json(os.path.join(directory, CONFIG_FILE)).get("tie_word_embeddings", False))
  tensors = TensorDir(directory)
  shapes = _qwen2_shapes(c)
  check_tensor_shapes(tensors, shapes, lambda name: _stored_name(name, tensors, tied, "model.embed_tokens.weight")
                      != name)
  name_of = lambda n: _stored_name(n, tensors, tied, "model.embed_tokens.weight")
  return c, names.backbone_leaf_readers(lambda n: tensors.get(name_of(n), shapes[n]), c, prefix="model.",
                                        get_rows=lambda n, a, b: tensors.get_rows(name_of(n), a, b))


def import_qwen2_backbone(directory: str, config: Any = None) -> dict:
  """Backbone params (the pure dict of ``NextStep.backbone``, numpy) from a Hugging Face
  ``Qwen2ForCausalLM`` directory (config.json + safetensors, ``model.``-prefixed names), each leaf read whole
  through the readers the streamed import uses (``qwen2_streamed_leaves``). Sizes come from config.json
  (``qwen2_config``; a `config` with sizes must agree). Tied checkpoints (``tie_word_embeddings``, no
  ``lm_head.weight``) get lm_head = embed_tokens."""
  c, readers = _qwen2_readers(directory, config)
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: bb.Backbone(c, rngs=nnx.Rngs(0))), nnx.Param))
  out: dict = {}
  for path, leaf in flatten_paths(abstract):
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = readers[path]((slice(None),) * len(leaf.shape))
  return out


def qwen2_streamed_leaves(directory: str, config: Any, target: Any) -> dict:
  """The backbone params of a Hugging Face ``Qwen2ForCausalLM`` directory as ``streamed.StreamedLeaf`` leaves
  (the tree of `target`, the backbone's abstract params with the dtype to store and the sharding to record),
  each read a piece at a time from the files as ``nextstep_streamed_leaves`` does (``_qwen2_readers``: sizes
  from config.json, which `config`'s must agree with; every tensor checked before it returns)."""
  return streamed_tree(directory, target, _qwen2_readers(directory, config)[1], prefix=("backbone",))
