"""Config checking and loading: fail before anything compiles, naming the field.

``validate(config, num_devices)`` checks a built config against the schema (see configs/common.py)
and the device count; ``apply_overrides`` sets dotted keys on a locked config, rejecting unknown
ones; ``load_config`` builds a config from a file or module, applies overrides and validates
(the training CLI uses ml_collections.config_flags instead, then calls ``validate``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from nextstep_jax import parallel
from nextstep_jax.models.attention import IMPLEMENTATIONS
from nextstep_jax.parallel import MESH_AXES, resolve_mesh_axes, rules_dict
from nextstep_jax.training import lora as lora_lib

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
# The schema's attention names; validate() uses the model's own list when it is importable.
ATTENTION = ("xla", "cudnn", "splash")
SCHEDULES = ("constant", "cosine")
PAYLOADS = ("images", "image_tokens")
TOKENIZERS = ("sentencepiece", "hf")
VAE_PRESETS = ("demo", "f8d16")
RATIO_KEYS = ("text", "pair", "edit", "interleaved")

# Fields that code reads; every config must have them (owners may add more).
SCHEMA: dict[str, tuple[str, ...]] = {
  "": ("seed", "workdir", "steps", "log_every", "eval_every"),
  "model": ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "rope_theta", "rms_norm_eps", "dtype", "param_dtype", "remat",
            "attention", "document_mask"),
  "head": ("dim", "num_layers", "batch_mul"),
  "image": ("latent_channels", "patch_size", "vae_factor", "token_norm", "token_dim"),
  "loss": ("ce_weight", "fm_weight"),
  "optim": ("lr", "min_lr", "schedule", "warmup_steps", "weight_decay", "b1", "b2", "eps",
            "clip_norm"),
  "mesh": ("axes", "rules"),
  "checkpoint": ("every", "keep", "async_save", "init_from"),
  "data": ("source", "batch_size", "seq_len", "ratios", "image_size", "min_image_tokens",
           "max_image_tokens", "max_images", "max_row_image_tokens", "drop_text_prob", "payload",
           "num_workers", "seed"),
  "tokenizer": ("kind", "path", "vocab_size"),
  "vae": ("preset", "checkpoint"),
}


def _attention_implementations() -> tuple[str, ...]:
  return tuple(IMPLEMENTATIONS)


class ConfigError(ValueError):
  """A config that cannot train; the message names every offending field."""


def _get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _has(config: Any, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
      return False
    node = node[part]
  return True


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_granules: int | None = None) -> None:
  """Raises ConfigError listing every problem of `config` (each naming its field).

  `num_devices` (e.g. jax.device_count(), after distributed start-up) enables the checks of
  the mesh against the devices and of the batch against the data-parallel size; without it,
  those run only as far as the mesh's fixed sizes allow. `num_granules` (TPU slices or processes,
  see parallel.num_granules) checks ``mesh.dcn_axes``; without it a ``mesh.dcn_axes`` with a -1 is checked
  only for its structure.
  """
  errors: list[str] = []
  missing = [f"{sec}.{f}" if sec else f for sec, fields in SCHEMA.items() for f in fields
             if not _has(config, f"{sec}.{f}" if sec else f)]
  if missing:
    raise ConfigError("config is missing fields: " + ", ".join(missing))

  def err(msg: str) -> None:
    errors.append(msg)

  def positive(*names: str) -> None:
    for n in names:
      v = _get(config, n)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        err(f"{n}={v!r} must be a positive number")

  def non_negative(*names: str) -> None:
    for n in names:
      v = _get(config, n)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        err(f"{n}={v!r} must be >= 0")

  def one_of(name: str, allowed: Sequence[str]) -> None:
    v = _get(config, name)
    if v not in allowed:
      err(f"{name}={v!r} is not one of {list(allowed)}")

  positive("steps", "log_every", "eval_every")

  # Model.
  m = config.model
  positive("model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
           "model.num_kv_heads", "model.head_dim", "model.intermediate_size", "model.rope_theta",
           "model.rms_norm_eps")
  for n in ("dtype", "param_dtype"):
    one_of(f"model.{n}", DTYPES)
  one_of("model.remat", REMAT)
  one_of("model.attention", _attention_implementations())
  if m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
    err(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
  if m.head_dim % 2:
    err(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
  if (not m.get("free_head_dim", False) and m.num_heads > 0
      and m.num_heads * m.head_dim != m.hidden_size):
    err(f"model.num_heads * model.head_dim = {m.num_heads} * {m.head_dim} != model.hidden_size"
        f"={m.hidden_size} (Qwen2 derives head_dim = hidden_size // num_heads; set "
        "model.free_head_dim=True to allow it)")

  # Head, image tokens, loss.
  positive("head.dim", "head.num_layers", "head.batch_mul")
  positive("image.latent_channels", "image.patch_size", "image.vae_factor")
  im = config.image
  if im.token_dim != im.latent_channels * im.patch_size ** 2:
    err(f"image.token_dim={im.token_dim} != image.latent_channels * image.patch_size**2 = "
        f"{im.latent_channels * im.patch_size ** 2}")
  non_negative("loss.ce_weight", "loss.fm_weight")
  ce_chunk = config.loss.get("ce_chunk", 0)
  if ce_chunk < 0 or (ce_chunk > 0 and config.data.seq_len % ce_chunk):
    err(f"loss.ce_chunk={ce_chunk} must be 0 (off) or divide data.seq_len={config.data.seq_len}")

  # Optimiser.
  o = config.optim
  positive("optim.lr", "optim.eps")
  non_negative("optim.min_lr", "optim.weight_decay", "optim.clip_norm", "optim.warmup_steps")
  one_of("optim.schedule", SCHEDULES)
  if isinstance(o.lr, (int, float)) and isinstance(o.min_lr, (int, float)) and o.min_lr > o.lr:
    err(f"optim.min_lr={o.min_lr} is larger than optim.lr={o.lr}")
  if o.warmup_steps > config.steps:
    err(f"optim.warmup_steps={o.warmup_steps} is longer than the run (steps={config.steps})")
  for n in ("b1", "b2"):
    v = o[n]
    if not 0.0 <= v < 1.0:
      err(f"optim.{n}={v} must be in [0, 1)")

  # Mesh and batch.
  d = config.data
  sizes = None
  try:
    axes = dict(config.mesh.axes)
    dcn = {k: int(v) for k, v in dict(config.mesh.get("dcn_axes", None) or {}).items()}
    hybrid = any(v != 1 for v in dcn.values())
    if hybrid and num_granules is None and -1 not in dcn.values():
      num_granules = math.prod(dcn.values())  # fixed DCN sizes name the granule count themselves
    if num_devices is not None and hybrid and num_granules is not None:
      # mesh.axes is per slice / node, mesh.dcn_axes across them.
      sizes = parallel.resolve_hybrid_axes(axes, dcn, num_devices, num_granules)[2]
    elif hybrid:
      # Structure only: the granule count (or the device count) is not known here.
      probe = math.prod(abs(v) for v in dcn.values()) or 1
      parallel.resolve_hybrid_axes({k: 1 for k in MESH_AXES}, dcn, probe, probe)
      resolve_mesh_axes(axes, math.prod(abs(int(v)) for v in axes.values()) or 1)
    elif num_devices is not None:
      sizes = resolve_mesh_axes(axes, num_devices)
    else:
      # Structure only; the device count is unknown.
      probe = math.prod(abs(int(v)) for v in axes.values()) or 1
      resolve_mesh_axes(axes, probe)
      if -1 not in axes.values():
        sizes = {k: int(axes.get(k, 1)) for k in MESH_AXES}
  except ValueError as e:
    err(str(e))
  try:
    rules_dict(config.mesh.rules)
  except ValueError as e:
    err(str(e))
  if sizes is not None:
    dp = sizes["data"] * sizes["fsdp"]
    if d.batch_size % dp:
      err(f"data.batch_size={d.batch_size} is not divisible by the data-parallel size "
          f"data*fsdp={sizes['data']}*{sizes['fsdp']}={dp}")
  elif isinstance(d.batch_size, int):
    fixed = math.prod(int(config.mesh.axes.get(k, 1)) for k in ("data", "fsdp")
                      if int(config.mesh.axes.get(k, 1)) > 0)
    if d.batch_size % fixed:
      err(f"data.batch_size={d.batch_size} is not divisible by the fixed data-parallel axes "
          f"(product {fixed})")

  # Gradient accumulation: each micro-batch must still split over the data-parallel devices.
  accum = o.get("grad_accum", 1)
  if not isinstance(accum, int) or accum < 1:
    err(f"optim.grad_accum={accum!r} must be an integer >= 1")
  elif d.batch_size % accum:
    err(f"data.batch_size={d.batch_size} is not divisible by optim.grad_accum={accum}")
  elif sizes is not None and (d.batch_size // accum) % (sizes["data"] * sizes["fsdp"]):
    err(f"data.batch_size / optim.grad_accum = {d.batch_size // accum} rows per micro-batch is not "
        f"divisible by the data-parallel size {sizes['data'] * sizes['fsdp']}")

  # Training extras.
  ema = config.get("ema_decay", 0.0)
  if not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
    err(f"ema_decay={ema!r} must be in [0, 1) (0 = no EMA)")
  if config.get("max_skipped_steps", 1) < 1:
    err(f"max_skipped_steps={config.get('max_skipped_steps')} must be >= 1")
  prof = config.get("profile_steps", "")
  if prof:
    try:
      lo, hi = (int(x) for x in str(prof).split(","))
      if not 0 <= lo < hi:
        raise ValueError
    except ValueError:
      err(f"profile_steps={prof!r} must be 'START,STOP' with 0 <= START < STOP (or empty)")

  if "lora" in config and int(config.lora.get("rank", 0) or 0) > 0:
    try:
      lora_lib.LoraConfig.from_config(config.lora)
    except ValueError as e:
      err(str(e))

  # Checkpoints.
  positive("checkpoint.every", "checkpoint.keep")

  # Data.
  positive("data.batch_size", "data.seq_len", "data.image_size", "data.min_image_tokens",
           "data.max_image_tokens", "data.max_images", "data.max_row_image_tokens")
  non_negative("data.num_workers")
  one_of("data.payload", PAYLOADS)
  if not 0.0 <= d.drop_text_prob <= 1.0:
    err(f"data.drop_text_prob={d.drop_text_prob} must be in [0, 1]")
  ratios = dict(d.ratios)
  if set(ratios) != set(RATIO_KEYS):
    err(f"data.ratios has keys {sorted(ratios)}, expected {list(RATIO_KEYS)}")
  negative = {k: v for k, v in ratios.items() if not isinstance(v, (int, float)) or v < 0}
  if negative:
    err(f"data.ratios must be >= 0, got {negative}")
  elif abs(sum(ratios.values()) - 1.0) > 1e-6:
    err(f"data.ratios sum to {sum(ratios.values()):.6g}, not 1: {ratios}")
  if d.min_image_tokens > d.max_image_tokens:
    err(f"data.min_image_tokens={d.min_image_tokens} > data.max_image_tokens={d.max_image_tokens}")
  if d.max_image_tokens > d.max_row_image_tokens:
    err(f"data.max_image_tokens={d.max_image_tokens} > data.max_row_image_tokens="
        f"{d.max_row_image_tokens} (one image must fit a row's image-token buffer)")
  if d.max_row_image_tokens > d.seq_len:
    err(f"data.max_row_image_tokens={d.max_row_image_tokens} > data.seq_len={d.seq_len}")
  if d.payload == "images":
    px = im.vae_factor * im.patch_size
    if d.image_size % px:
      err(f"data.image_size={d.image_size} is not a multiple of image.vae_factor * "
          f"image.patch_size = {px}")
    else:
      per_image = (d.image_size // px) ** 2
      if not d.min_image_tokens <= per_image <= d.max_image_tokens:
        err(f"data.image_size={d.image_size} gives {per_image} tokens per image, outside "
            f"[data.min_image_tokens, data.max_image_tokens] = "
            f"[{d.min_image_tokens}, {d.max_image_tokens}]")
      if d.max_images * per_image > d.max_row_image_tokens:
        err(f"data.max_images * tokens per image = {d.max_images} * {per_image} > "
            f"data.max_row_image_tokens={d.max_row_image_tokens}")

  # Tokenizer and VAE.
  one_of("tokenizer.kind", TOKENIZERS)
  positive("tokenizer.vocab_size")
  if config.tokenizer.vocab_size > m.vocab_size:
    err(f"tokenizer.vocab_size={config.tokenizer.vocab_size} > model.vocab_size={m.vocab_size}")
  one_of("vae.preset", VAE_PRESETS)

  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


# ------------------------------------------------------------------------------------------
# Overrides and loading
# ------------------------------------------------------------------------------------------


def _parse_value(raw: str, current: Any) -> Any:
  """Parses a command-line value by the type of the field it replaces."""
  if isinstance(current, bool):
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a bool, got {raw!r}")
  if isinstance(current, str):
    return raw
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _split_override(item: str) -> tuple[str, str]:
  if "=" not in item:
    raise ConfigError(f"override {item!r} must look like key.sub=value")
  key, raw = item.split("=", 1)
  key = key.strip()
  if key.startswith("--"):
    key = key[2:]
  if key.startswith("config."):
    key = key[len("config."):]
  return key, raw


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Sequence[str]) -> ml_collections.ConfigDict:
  """Sets dotted keys on `config` in place; returns it.

  `overrides` is {"optim.lr": 1e-3} (values used as given) or ["optim.lr=1e-3", ...] (values
  parsed by the field's type: literals for numbers/tuples, raw text for strings). Every key is
  checked before any is set; an unknown key or a value of the wrong type raises ConfigError
  naming the key.
  """
  if isinstance(overrides, Mapping):
    items = [(k, v, False) for k, v in overrides.items()]
  else:
    items = [(*_split_override(s), True) for s in overrides]
  unknown = []
  for key, _, _ in items:
    if not _has(config, key):
      parent, _, leaf = key.rpartition(".")
      known = (sorted(_get(config, parent).keys()) if parent and _has(config, parent)
               else sorted(config.keys()))
      unknown.append(f"{key!r} (known under {parent or 'the top level'}: {known})")
  if unknown:
    raise ConfigError("unknown config keys: " + "; ".join(unknown))
  for key, value, is_text in items:
    parent, _, leaf = key.rpartition(".")
    node = _get(config, parent) if parent else config
    try:
      if is_text:
        value = _parse_value(value, node[leaf])
      node[leaf] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"cannot set {key}={value!r}: {e}") from e
  return config


def _load_module(target: str | types.ModuleType) -> types.ModuleType:
  if isinstance(target, types.ModuleType):
    return target
  if target.endswith(".py") or os.sep in target or "/" in target:
    if not os.path.isfile(target):
      raise ConfigError(f"config file {target!r} does not exist")
    name = "_nextstep_config_" + os.path.splitext(os.path.basename(target))[0]
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return importlib.import_module(target)


def load_config(path_or_module: str | types.ModuleType, overrides: Sequence[str] | Mapping[str, Any] = (),
                num_devices: int | None = None, check: bool = True) -> ml_collections.ConfigDict:
  """Builds ``get_config()`` of a config file/module, applies overrides, validates.

  `path_or_module`: "configs/demo.py", "configs.demo", a module, or any of these with
  ":arg" appended (passed to ``get_config(arg)`` as ml_collections.config_flags does).
  """
  arg = None
  if isinstance(path_or_module, str) and ":" in path_or_module:
    path_or_module, arg = path_or_module.split(":", 1)
  module = _load_module(path_or_module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{getattr(module, '__file__', module)} has no get_config()")
  config = module.get_config() if arg is None else module.get_config(arg)
  apply_overrides(config, overrides)
  if check:
    validate(config, num_devices=num_devices)
  return config
