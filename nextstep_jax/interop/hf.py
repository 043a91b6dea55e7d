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
import json
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from nextstep_jax.interop import names
from nextstep_jax.interop import vae as vae_interop
from nextstep_jax.interop.params import load_pure_params
from nextstep_jax.interop.safetensors_io import (DEFAULT_SHARD_BYTES, CheckpointError, TensorDir, _read_json,
                                                 save_sharded)
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


def hf_config(cfg: ns.NextStepConfig, meta: ImageMeta, dtype: str = "float32",
              max_position_embeddings: int = 32768) -> dict:
  """config.json for a NextStep-1 directory: Qwen2/Llama fields plus the NextStep-1 fields (SPEC §9)."""
  c, h = cfg.backbone, cfg.head
  if meta.latent_channels * meta.latent_patch_size**2 != cfg.token_dim:
    raise ValueError(f"latent_channels={meta.latent_channels} x latent_patch_size={meta.latent_patch_size}^2 "
                     f"does not give the model's token_dim={cfg.token_dim}")
  return {
      "architectures": ["NextStep"], "model_type": "nextstep",
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
      "max_position_embeddings": max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "rope_scaling": None, "tie_word_embeddings": False,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_sliding_window": False, "sliding_window": None,
      "max_window_layers": c.num_layers, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
      "bos_token_id": None, "eos_token_id": meta.eos_token_id, "pad_token_id": meta.pad_token_id,
      "latent_size": meta.latent_size, "latent_patch_size": meta.latent_patch_size,
      "latent_channels": meta.latent_channels, "boi": meta.boi, "eoi": meta.eoi,
      "image_placeholder_id": meta.image_placeholder_id, "image_area_id": meta.image_area_id,
      "lm_loss_weight": cfg.ce_weight, "im_loss_weight": cfg.fm_weight, "fm_head_dim": h.dim,
      "fm_head_layers": h.num_layers, "fm_head_batch_mul": h.batch_mul, "token_norm": cfg.token_norm,
  }


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


def config_from_hf(d: Mapping, source: str = "config.json", *, runtime: Any = None
                   ) -> tuple[ns.NextStepConfig, ImageMeta]:
  """(NextStepConfig, ImageMeta) from a NextStep-1 config.json dict. `runtime`: a BackboneConfig, an
  experiment config or a dict giving dtype/param_dtype/remat/attention/document_mask (defaults otherwise)."""
  f = _backbone_fields(d, source)
  f.update(_runtime(runtime))
  backbone = _checked_backbone(f, source)
  channels = _field(d, "latent_channels", source, int, positive=True)
  patch = _field(d, "latent_patch_size", source, int, positive=True)
  token_dim = channels * patch**2
  head = fm_head.HeadConfig(dim=_field(d, "fm_head_dim", source, int, positive=True),
                            num_layers=_field(d, "fm_head_layers", source, int, positive=True),
                            cond_dim=backbone.hidden_size, token_dim=token_dim,
                            batch_mul=_field(d, "fm_head_batch_mul", source, int, default=4, positive=True),
                            dtype=backbone.dtype, param_dtype=backbone.param_dtype, remat=backbone.remat)
  cfg = ns.NextStepConfig(backbone=backbone, head=head, token_dim=token_dim,
                          token_norm=_field(d, "token_norm", source, bool, default=True),
                          ce_weight=_field(d, "lm_loss_weight", source, float, default=0.01),
                          fm_weight=_field(d, "im_loss_weight", source, float, default=1.0))
  opt = lambda k: _field(d, k, source, int, default=None)
  meta = ImageMeta(latent_channels=channels, latent_patch_size=patch,
                   latent_size=opt("latent_size"), boi=opt("boi"), eoi=opt("eoi"), image_placeholder_id=opt("image_placeholder_id"),
                   image_area_id=opt("image_area_id"), eos_token_id=_token_id(d, "eos_token_id", source),
                   pad_token_id=_token_id(d, "pad_token_id", source))
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
                    tokenizer: Any = None, vae: Any = None) -> dict:
  """Writes a NextStep-1 Hugging Face directory. Returns the shard index.

  model_or_params: a NextStep module or its pure params dict (numpy or jax arrays, possibly sharded:
  each tensor is fetched as it is written). dtype: storage dtype (float32 keeps export -> import
  bitwise; the release stores bfloat16). tokenizer: a directory/file to copy, or an object with
  ``save(dir)`` (``nextstep_jax.data.tokenizer.Tokenizer``) or ``save_pretrained(dir)``. vae: a directory
  (copied to ``vae/``), a file (copied into ``vae/``), or an ``AutoencoderKL`` (``interop.vae.export_vae``).
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
  os.makedirs(out_dir, exist_ok=True)
  index = save_sharded(out_dir, entries, names.nextstep_to_tensors(params, cfg), max_shard_bytes)
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    _copy_tokenizer(tokenizer, out_dir)
  if vae is not None:
    _copy_vae(vae, os.path.join(out_dir, VAE_DIR))
  return index


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


def read_nextstep_config(directory: str, runtime: Any = None) -> tuple[ns.NextStepConfig, ImageMeta]:
  """config.json of a NextStep-1 directory -> (NextStepConfig, ImageMeta)."""
  path = os.path.join(directory, CONFIG_FILE)
  return config_from_hf(_read_json(path), path, runtime=runtime)


def load_nextstep_params(directory: str, cfg: ns.NextStepConfig) -> dict:
  """The model's pure params dict (numpy) from a NextStep-1 directory, every tensor checked against the
  shapes `cfg` implies and, as it is read, for NaN/Inf (errors name the file and tensor)."""
  tensors = TensorDir(directory)
  shapes = checkpoint_shapes(cfg)
  extra = sorted(set(tensors.names()) - set(shapes))
  if extra:
    raise CheckpointError(f"{directory}: unexpected tensors {extra[:8]}{'...' if len(extra) > 8 else ''} "
                          "(config.json does not describe them)")
  return names.nextstep_from_tensors(lambda n: tensors.get(n, shapes.get(n)), cfg)


def load_nextstep(directory: str, runtime: Any = None) -> tuple[ns.NextStep, ImageMeta]:
  """(model, image meta) from a NextStep-1 directory: config.json -> NextStepConfig -> weights.

  The model is built abstractly and filled with the checkpoint (no random initialisation); params are
  cast to the config's param_dtype (float32 by default; `runtime` may set dtype/param_dtype/...).
  """
  cfg, meta = read_nextstep_config(directory, runtime)
  params = load_nextstep_params(directory, cfg)
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


def import_qwen2_backbone(directory: str, config: Any = None) -> dict:
  """Backbone params (the pure dict of ``NextStep.backbone``, numpy) from a Hugging Face
  ``Qwen2ForCausalLM`` directory (config.json + safetensors, ``model.``-prefixed names). Sizes come from
  config.json (``qwen2_config``; a `config` with sizes must agree). Tied checkpoints
  (``tie_word_embeddings``, no ``lm_head.weight``) get lm_head = embed_tokens."""
  c = qwen2_config(directory, config)
  tied = bool(_read_json(os.path.join(directory, CONFIG_FILE)).get("tie_word_embeddings", False))
  tensors = TensorDir(directory)
  shapes = _qwen2_shapes(c)

  def get(name: str) -> np.ndarray:
    if name == "lm_head.weight" and name not in tensors and tied:
      name = "model.embed_tokens.weight"
    return tensors.get(name, shapes[name])

  return names.backbone_from_tensors(get, c, prefix="model.")
