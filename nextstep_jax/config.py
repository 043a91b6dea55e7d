"""The config schema, its checks, and loading: fail before anything compiles, naming the field.

``base_config(backbone, head)`` is the transformer's schema: every field and its default, stated once
(model sizes from ``BACKBONES`` / ``HEADS``); ``vae_base_config(preset)`` is the VAE trainer's, in the
same vocabulary (``steps``, ``optim.*``, ``checkpoint.*``, ``data.*``). Experiment configs
(``configs/<name>.py``) start from them. ``validate(config, num_devices)`` checks a config section by
section (the mesh through ``parallel.check_mesh``); ``with_defaults`` completes a config saved by an
older run. Overrides and loading a config file: ``nextstep_jax/overrides.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from nextstep_jax import parallel
from nextstep_jax import storage
from nextstep_jax.errors import UserError  # re-exported: the one user-error type
from nextstep_jax.models import vae as vae_lib
from nextstep_jax.models.attention import IMPLEMENTATIONS
from nextstep_jax.models.presets import BACKBONES, HEADS
from nextstep_jax.parallel import DEFAULT_RULES
from nextstep_jax.training import optim as optim_lib
from nextstep_jax.training import lora as lora_lib

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")
SCHEDULES = ("constant", "cosine")
PAYLOADS = ("images", "image_tokens")
TOKENIZERS = ("sentencepiece", "hf")
VAE_PRESETS = ("demo", "f8d16")
RATIO_KEYS = ("text", "pair", "edit", "interleaved")
INTEGRITY_MODES = ("auto", "crc32", "size", "off")




class ConfigError(UserError):
  """A config that cannot train; the message names every offending field."""


# ---------------------------------------------------------------------------------------------
# The schemas
# ---------------------------------------------------------------------------------------------

def base_config(backbone: str = "tiny", head: str = "tiny") -> ml_collections.ConfigDict:
  """Every field of the transformer's config schema with its default, sized by a backbone and a head
  preset (unlocked). The one place a field and its default are stated: experiment configs
  (``configs/<name>.py``) start here, change what differs, and lock the result."""
  if backbone not in BACKBONES:
    raise KeyError(f"unknown backbone preset {backbone!r}; known: {sorted(BACKBONES)}")
  if head not in HEADS:
    raise KeyError(f"unknown head preset {head!r}; known: {sorted(HEADS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"
  c.steps = 1000
  c.log_every = 10
  c.eval_every = 500
  c.eval_batches = 2           # held-out batches per data source at each evaluation
  c.sample_prompts = ()        # fixed prompts for the periodic sample grid (empty: none)
  c.sample_cfg = 3.0           # classifier-free guidance of that grid
  c.ema_decay = 0.0            # EMA of the weights (0 = off), kept in the checkpoint
  c.max_skipped_steps = 10     # consecutive non-finite steps before the run stops
  c.profile_steps = ""         # "START,STOP": a jax.profiler trace of those steps

  c.model = ml_collections.ConfigDict(dict(BACKBONES[backbone]))
  c.model.preset = backbone
  c.model.dtype = "float32"          # compute dtype
  c.model.param_dtype = "float32"    # master weights
  c.model.remat = "none"
  c.model.attention = "xla"
  c.model.document_mask = True       # segment-id mask, positions reset per packed sample
  # True allows num_heads * head_dim != hidden_size (Qwen3-style); Qwen2.5 checkpoints derive
  # head_dim = hidden_size // num_heads, so the validator insists on it by default.
  c.model.free_head_dim = False

  c.head = ml_collections.ConfigDict(dict(HEADS[head]))
  c.head.preset = head

  c.image = ml_collections.ConfigDict()
  c.image.latent_channels = 16
  c.image.patch_size = 2
  c.image.vae_factor = 8
  c.image.token_norm = True
  # Derived and stored: follows latent_channels / patch_size when they are overridden.
  c.image.token_dim = c.image.get_ref("latent_channels") * c.image.get_ref("patch_size") ** 2

  # ce_chunk > 0: LM head + CE in sequence chunks of this many positions (never holds the
  # full (B, L, vocab) logits); must divide data.seq_len.
  c.loss = ml_collections.ConfigDict(dict(ce_weight=0.01, fm_weight=1.0, ce_chunk=0))

  c.optim = ml_collections.ConfigDict(dict(
    lr=1e-4, min_lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.1,
    b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
    # Gradient accumulation steps per update; 0 = derived from data.micro_batch_per_device and the
    # mesh (see batch_plan).
    grad_accum=1))

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Across slices / nodes (DCN); with any size > 1, mesh.axes is per slice (nextstep_jax/parallel.py).
  c.mesh.dcn_axes = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.mesh.rules = DEFAULT_RULES

  # integrity: "auto" (CRC-32 up to 4 GiB a step, then sizes), "crc32", "size" or "off".
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True, init_from="",
                                                integrity="auto"))

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"
  c.data.batch_size = 8               # global rows per optimizer update
  c.data.micro_batch_per_device = 0   # rows per data-parallel device per micro-batch (optim.grad_accum=0)
  c.data.seq_len = 128
  c.data.ratios = ml_collections.ConfigDict(dict(text=0.2, pair=0.6, edit=0.0, interleaved=0.2))
  # True: the ratios are shared out over the kinds data.source holds records of (a kind with a
  # positive ratio but no records is otherwise refused); they need not sum to 1 then.
  c.data.renormalize = False
  c.data.image_size = 256
  c.data.min_image_tokens = 256
  c.data.max_image_tokens = 256
  c.data.max_images = 1
  c.data.max_row_image_tokens = 256
  c.data.drop_text_prob = 0.3
  # False (SFT): CE and FM only on the response (the image after a caption, the target after an
  # edit instruction); no CE predicts the caption or instruction (data/sequences.py).
  c.data.loss_on_prompt = True
  c.data.payload = "image_tokens"
  c.data.num_workers = 0              # grain worker processes (0: in the training process)
  c.data.num_threads = 0              # grain read threads (0: grain's default, no prefetch)
  c.data.pack_open_rows = 8           # rows the packer keeps open to fill gaps
  c.data.seed = 0

  c.tokenizer = ml_collections.ConfigDict(dict(kind="sentencepiece", path="",
                                               vocab_size=c.model.vocab_size))
  c.vae = ml_collections.ConfigDict(dict(preset="f8d16", checkpoint=""))
  # LoRA (rank 0 = off): adapters on the named projections train, the base weights stay frozen.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=32.0, targets=("q", "k", "v", "o"), head_targets=()))
  return c


def vae_base_config(preset: str = "demo") -> ml_collections.ConfigDict:
  """Every field of the VAE trainer's config with its default, the architecture of ``preset``
  (unlocked); ``configs/vae_*.py`` start here and lock it."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""
  c.steps = 1000
  c.log_every = 50
  c.eval_every = 500
  c.vae = ml_collections.ConfigDict(dict(preset=preset, **vae_lib.preset(preset).to_dict()))
  c.vae.channel_mults = tuple(c.vae.channel_mults)
  c.data = ml_collections.ConfigDict(dict(
      source="digits",  # "digits" (embedded MNIST 5k) or a folder of images
      image_size=32,
      heldout_every=10,  # folder source: every 10th file (sorted) is held out
      batch_size=32,
  ))
  # AdamW and its schedule (training/optim.py), the same fields as the transformer's.
  c.optim = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=0.0, schedule="constant", warmup_steps=20,
                                           weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, clip_norm=1.0))
  c.train = ml_collections.ConfigDict(dict(
      # latent noise augmentation (SPEC §8)
      noise_aug=True, gamma=0.2,
      sample_posterior=True,
      # loss weights
      l1_weight=1.0, l2_weight=1.0, kl_weight=1e-4, perceptual_weight=0.0,
      adv_weight=0.0, adv_start=0, disc_lr=1e-4, disc_channels=32,
  ))
  c.eval = ml_collections.ConfigDict(dict(num_images=0, batch_size=100, grid_images=16))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2, async_save=False, integrity="auto"))
  return c


def dpo_section(beta: float = 1000.0, data: str = "", reference: str = "") -> ml_collections.ConfigDict:
  """The ``dpo`` fields of a DPO config.

  beta: the DPO temperature; reduction: "mean" (per-token errors averaged over an image's tokens)
  or "sum"; data: the preference directory (train.jsonl, heldout.jsonl, images/); reference: the
  frozen reference checkpoint ("" = checkpoint.init_from); sft_weight: optional weight of the
  chosen images' FM error added to the loss (0 = pure DPO); heldout_batches: held-out pair
  batches evaluated every ``eval_every`` steps (when heldout.jsonl exists).
  """
  return ml_collections.ConfigDict(dict(beta=float(beta), reduction="mean", data=data, reference=reference,
                                        sft_weight=0.0, heldout_batches=2))


def head_distill_base_config() -> ml_collections.ConfigDict:
  """Every field of the few-step head's distillation (``nextstep_jax.training.head_distill``) with its
  default (unlocked); ``configs/head_distill_*.py`` start here and lock it.

  teacher: the trained run's work directory; out: where the head goes ("" = <teacher>/heads/k<evaluations>);
  evaluations: K, the student's head evaluations per token; teacher_steps, cfg, time_shift, use_norm: the
  teacher's guided ODE (the sampler the student learns, and the settings it samples with); prompts:
  "digits" (the digit captions) or a text file of captions, one per line; num_images: teacher images
  whose tokens' conditions train the student (a tenth held out); sample_batch: images per sampler call;
  image_size: 0 = the run's data.image_size."""
  c = ml_collections.ConfigDict()
  c.teacher = ""
  c.out = ""
  c.overwrite = False
  c.seed = 0
  c.evaluations = 4
  c.teacher_steps = 28
  c.cfg = 3.0
  c.time_shift = 1.0
  c.use_norm = True
  c.image_size = 0
  c.prompts = "digits"
  c.num_images = 2000
  c.sample_batch = 100
  c.train = ml_collections.ConfigDict(dict(steps=2000, batch_tokens=256, rollout_weight=0.0, log_every=100))
  c.optim = ml_collections.ConfigDict(dict(lr=3e-4, min_lr=3e-5, schedule="cosine", warmup_steps=100,
                                           weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, clip_norm=1.0))
  return c


def _fields(c: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """{section: its fields} of a schema ("" = top level); dict-valued fields (ratios, axes, rules)
  count as one field."""
  out: dict[str, tuple[str, ...]] = {"": tuple(k for k, v in c.items()
                                              if not isinstance(v, ml_collections.ConfigDict))}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict) and k not in ("mesh",):
      out[k] = tuple(v.keys())
  if "mesh" in c:
    out["mesh"] = ("axes", "dcn_axes", "rules")
  return out


# Fields that code reads; every transformer config has them (experiments may add more).
SCHEMA: dict[str, tuple[str, ...]] = _fields(base_config())


def with_defaults(config: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (e.g. a run's saved config.json) completed with the schema's defaults for the fields it
  lacks (a run saved by an older version); every field it has is kept as it is."""
  out = base_config()

  def merge(dst: ml_collections.ConfigDict, src: Mapping[str, Any]) -> None:
    for k, v in src.items():
      if isinstance(v, (Mapping, ml_collections.ConfigDict)) and isinstance(dst.get(k), ml_collections.ConfigDict) \
          and k not in ("ratios", "axes", "dcn_axes", "rules"):
        merge(dst[k], v)
      else:
        dst[k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v

  with out.unlocked():
    for key in ("model", "head"):  # sized by a preset: drop the preset's other fields first
      if key in config:
        out[key] = ml_collections.ConfigDict()
    merge(out, config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
  return out


# ---------------------------------------------------------------------------------------------
# Checks, section by section
# ---------------------------------------------------------------------------------------------

def get_dotted(config: Any, dotted: str) -> Any:
  """config["a"]["b"] for "a.b"."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def has_dotted(config: Any, dotted: str) -> bool:
  """Whether `config` has the dotted key ("optim.lr")."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
      return False
    node = node[part]
  return True


class _Checks:
  """Collects every problem of a config (each message names its field)."""

  def __init__(self, config):
    self.config = config
    self.errors: list[str] = []

  def err(self, msg: str) -> None:
    self.errors.append(msg)

  def positive(self, *names: str) -> None:
    for n in names:
      v = get_dotted(self.config, n)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        self.err(f"{n}={v!r} must be a positive number")

  def non_negative(self, *names: str) -> None:
    for n in names:
      v = get_dotted(self.config, n)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        self.err(f"{n}={v!r} must be >= 0")

  def one_of(self, name: str, allowed: Sequence[str]) -> None:
    v = get_dotted(self.config, name)
    if v not in allowed:
      self.err(f"{name}={v!r} is not one of {list(allowed)}")


def _missing(config, schema: Mapping[str, Sequence[str]]) -> list[str]:
  return [f"{sec}.{f}" if sec else f for sec, fields in schema.items() for f in fields
          if not has_dotted(config, f"{sec}.{f}" if sec else f)]


def _check_run(ck: _Checks) -> None:
  c = ck.config
  ck.positive("steps", "log_every", "eval_every", "eval_batches", "max_skipped_steps")
  if not isinstance(c.ema_decay, (int, float)) or not 0.0 <= c.ema_decay < 1.0:
    ck.err(f"ema_decay={c.ema_decay!r} must be in [0, 1) (0 = no EMA)")
  if c.profile_steps:
    try:
      lo, hi = (int(x) for x in str(c.profile_steps).split(","))
      if not 0 <= lo < hi:
        raise ValueError
    except ValueError:
      ck.err(f"profile_steps={c.profile_steps!r} must be 'START,STOP' with 0 <= START < STOP (or empty)")


def _check_model(ck: _Checks) -> None:
  m = ck.config.model
  ck.positive("model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
              "model.num_kv_heads", "model.head_dim", "model.intermediate_size", "model.rope_theta",
              "model.rms_norm_eps")
  for n in ("dtype", "param_dtype"):
    ck.one_of(f"model.{n}", DTYPES)
  ck.one_of("model.remat", REMAT)
  ck.one_of("model.attention", tuple(IMPLEMENTATIONS))
  if m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
    ck.err(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
  if m.head_dim % 2:
    ck.err(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
  if not m.free_head_dim and m.num_heads > 0 and m.num_heads * m.head_dim != m.hidden_size:
    ck.err(f"model.num_heads * model.head_dim = {m.num_heads} * {m.head_dim} != model.hidden_size"
           f"={m.hidden_size} (Qwen2 derives head_dim = hidden_size // num_heads; set "
           "model.free_head_dim=True to allow it)")


def _check_head_image_loss(ck: _Checks) -> None:
  c = ck.config
  ck.positive("head.dim", "head.num_layers", "head.batch_mul")
  ck.positive("image.latent_channels", "image.patch_size", "image.vae_factor")
  im = c.image
  if im.token_dim != im.latent_channels * im.patch_size ** 2:
    ck.err(f"image.token_dim={im.token_dim} != image.latent_channels * image.patch_size**2 = "
           f"{im.latent_channels * im.patch_size ** 2}")
  ck.non_negative("loss.ce_weight", "loss.fm_weight")
  if c.loss.ce_chunk < 0 or (c.loss.ce_chunk > 0 and c.data.seq_len % c.loss.ce_chunk):
    ck.err(f"loss.ce_chunk={c.loss.ce_chunk} must be 0 (off) or divide data.seq_len={c.data.seq_len}")


def _check_optim(ck: _Checks) -> None:
  c, o = ck.config, ck.config.optim
  ck.positive("optim.lr", "optim.eps")
  ck.non_negative("optim.min_lr", "optim.weight_decay", "optim.clip_norm", "optim.warmup_steps")
  ck.one_of("optim.schedule", SCHEDULES)
  if isinstance(o.lr, (int, float)) and isinstance(o.min_lr, (int, float)) and o.min_lr > o.lr:
    ck.err(f"optim.min_lr={o.min_lr} is larger than optim.lr={o.lr}")
  if o.warmup_steps > c.steps:
    ck.err(f"optim.warmup_steps={o.warmup_steps} is longer than the run (steps={c.steps})")
  for n in ("b1", "b2"):
    if not 0.0 <= o[n] < 1.0:
      ck.err(f"optim.{n}={o[n]} must be in [0, 1)")
  if not isinstance(o.grad_accum, int) or o.grad_accum < 0:
    ck.err(f"optim.grad_accum={o.grad_accum!r} must be an integer >= 1, or 0 to derive it from "
           "data.micro_batch_per_device")


def _check_mesh_and_batch(ck: _Checks, num_devices: int | None, num_granules: int | None) -> None:
  """The mesh against the devices (``parallel.check_mesh``), then the batch against the data-parallel
  size and the gradient accumulation."""
  c, d = ck.config, ck.config.data
  sizes = None
  try:
    sizes = parallel.check_mesh(c.mesh, num_devices, num_granules)
  except ValueError as e:
    ck.err(str(e))
  try:
    parallel.rules_dict(c.mesh.rules)
  except ValueError as e:
    ck.err(str(e))
  divides = True
  if sizes is not None:
    dp = sizes["data"] * sizes["fsdp"]
    if d.batch_size % dp:
      divides = False
      ck.err(f"data.batch_size={d.batch_size} is not divisible by the data-parallel size "
             f"data*fsdp={sizes['data']}*{sizes['fsdp']}={dp}")
  elif isinstance(d.batch_size, int):
    fixed = math.prod(int(c.mesh.axes.get(k, 1)) for k in ("data", "fsdp") if int(c.mesh.axes.get(k, 1)) > 0)
    if d.batch_size % fixed:
      ck.err(f"data.batch_size={d.batch_size} is not divisible by the fixed data-parallel axes "
             f"(product {fixed})")
  accum = c.optim.grad_accum
  if isinstance(accum, int) and accum >= 1 and d.batch_size % accum:
    ck.err(f"data.batch_size={d.batch_size} is not divisible by optim.grad_accum={accum}")
  elif isinstance(accum, int) and accum >= 0 and divides:  # each micro-batch must split over the devices
    try:
      batch_plan(c, None if sizes is None else sizes["data"] * sizes["fsdp"])
    except ConfigError as e:
      ck.err(str(e))


def _check_checkpoint_and_lora(ck: _Checks) -> None:
  c = ck.config
  ck.positive("checkpoint.every", "checkpoint.keep")
  ck.one_of("checkpoint.integrity", INTEGRITY_MODES)
  if int(c.lora.rank or 0) > 0:
    try:
      lora_lib.LoraConfig.from_config(c.lora)
    except ValueError as e:
      ck.err(str(e))


def _check_data(ck: _Checks) -> None:
  c, d, im = ck.config, ck.config.data, ck.config.image
  ck.positive("data.batch_size", "data.seq_len", "data.image_size", "data.min_image_tokens",
              "data.max_image_tokens", "data.max_images", "data.max_row_image_tokens")
  ck.non_negative("data.num_workers")
  ck.one_of("data.payload", PAYLOADS)
  if not 0.0 <= d.drop_text_prob <= 1.0:
    ck.err(f"data.drop_text_prob={d.drop_text_prob} must be in [0, 1]")
  ratios = dict(d.ratios)
  if set(ratios) != set(RATIO_KEYS):
    ck.err(f"data.ratios has keys {sorted(ratios)}, expected {list(RATIO_KEYS)}")
  negative = {k: v for k, v in ratios.items() if not isinstance(v, (int, float)) or v < 0}
  if negative:
    ck.err(f"data.ratios must be >= 0, got {negative}")
  elif d.renormalize and sum(ratios.values()) <= 0:
    ck.err(f"data.ratios must have a positive entry, got {ratios}")
  elif not d.renormalize and abs(sum(ratios.values()) - 1.0) > 1e-6:
    ck.err(f"data.ratios sum to {sum(ratios.values()):.6g}, not 1: {ratios} (or set "
           "data.renormalize=True to use them as relative weights)")
  if d.min_image_tokens > d.max_image_tokens:
    ck.err(f"data.min_image_tokens={d.min_image_tokens} > data.max_image_tokens={d.max_image_tokens}")
  if d.max_image_tokens > d.max_row_image_tokens:
    ck.err(f"data.max_image_tokens={d.max_image_tokens} > data.max_row_image_tokens="
           f"{d.max_row_image_tokens} (one image must fit a row's image-token buffer)")
  if d.max_row_image_tokens > d.seq_len:
    ck.err(f"data.max_row_image_tokens={d.max_row_image_tokens} > data.seq_len={d.seq_len}")
  if d.payload == "images":
    px = im.vae_factor * im.patch_size
    if d.image_size % px:
      ck.err(f"data.image_size={d.image_size} is not a multiple of image.vae_factor * "
             f"image.patch_size = {px}")
    else:
      per_image = (d.image_size // px) ** 2
      if not d.min_image_tokens <= per_image <= d.max_image_tokens:
        ck.err(f"data.image_size={d.image_size} gives {per_image} tokens per image, outside "
               f"[data.min_image_tokens, data.max_image_tokens] = "
               f"[{d.min_image_tokens}, {d.max_image_tokens}]")
      if d.max_images * per_image > d.max_row_image_tokens:
        ck.err(f"data.max_images * tokens per image = {d.max_images} * {per_image} > "
               f"data.max_row_image_tokens={d.max_row_image_tokens}")
  del c


def _check_tokenizer_and_vae(ck: _Checks) -> None:
  c = ck.config
  ck.one_of("tokenizer.kind", TOKENIZERS)
  ck.positive("tokenizer.vocab_size")
  if c.tokenizer.vocab_size > c.model.vocab_size:
    ck.err(f"tokenizer.vocab_size={c.tokenizer.vocab_size} > model.vocab_size={c.model.vocab_size}")
  ck.one_of("vae.preset", VAE_PRESETS)


def batch_plan(config, data_parallel: int | None) -> tuple[int, int]:
  """(rows per data-parallel device in each micro-batch, accumulation steps) of one update of the global
  batch ``data.batch_size`` over `data_parallel` (= mesh data * fsdp) devices.

  ``optim.grad_accum`` = K > 0 sets the steps (each micro-batch is batch / K rows); K = 0 derives them
  from ``data.micro_batch_per_device`` = m: K = batch / (m * data_parallel). Raises ConfigError naming
  the numbers when they do not divide. `data_parallel` None (unknown): checks what it can, returns
  (0, K) when K is not known yet."""
  batch, accum = int(config.data.batch_size), int(config.optim.grad_accum)
  micro = int(config.data.micro_batch_per_device)
  if accum == 0:
    if micro < 1:
      raise ConfigError(f"optim.grad_accum=0 derives the accumulation from data.micro_batch_per_device, "
                        f"which is {micro}; set it to the rows per device of each micro-batch (e.g. 1)")
    if data_parallel is None:
      return micro, 0
    rows = micro * data_parallel
    if batch % rows:
      raise ConfigError(f"data.batch_size={batch} is not a multiple of data.micro_batch_per_device * "
                        f"data-parallel devices = {micro} * {data_parallel} = {rows}; choose a global batch "
                        f"or a micro-batch that divides it (or set optim.grad_accum)")
    return micro, batch // rows
  if data_parallel is None:
    return 0, accum
  if batch % accum or (batch // accum) % data_parallel:
    raise ConfigError(f"data.batch_size / optim.grad_accum = {batch} / {accum} rows per micro-batch is not "
                      f"divisible by the data-parallel size {data_parallel}")
  return batch // accum // data_parallel, accum


def check_paths(config) -> None:
  """The inputs a run cannot start without, checked before anything else; the message names the field
  and the override that sets it."""
  c, problems = config, []
  if not c.tokenizer.path and c.tokenizer.kind != "sentencepiece":
    problems.append(f"tokenizer.path is empty: tokenizer.kind={c.tokenizer.kind!r} reads a Hugging Face "
                    "tokenizer.json (the Qwen2.5 one for the stage configs); set "
                    "--config.tokenizer.path=/path/to/tokenizer.json")
  if not c.data.source:
    problems.append("data.source is empty: set --config.data.source=DIR (ArrayRecord records written by "
                    "python -m nextstep_jax.data prepare) or --config.data.source=digits")
  if c.data.payload == "images" and not c.vae.checkpoint:
    problems.append("vae.checkpoint is empty: data.payload='images' encodes pixels with a trained VAE; set "
                    "--config.vae.checkpoint=<train_vae work directory> (python -m nextstep_jax.train_vae "
                    "--config=configs/vae_demo.py), or precomputed latents with "
                    "--config.data.payload=image_tokens")
  if problems:
    raise ConfigError("\n".join(problems))


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_granules: int | None = None, *, paths: bool = True) -> None:
  """Raises ConfigError listing every problem of `config` (each naming its field).

  `num_devices` (e.g. jax.device_count(), after distributed start-up) enables the checks of
  the mesh against the devices and of the batch against the data-parallel size; without it,
  those run only as far as the mesh's fixed sizes allow. `num_granules` (TPU slices or processes,
  see parallel.num_granules) checks ``mesh.dcn_axes``; without it a ``mesh.dcn_axes`` with a -1 is
  checked only for its structure. `paths`: first check the inputs a run needs (``check_paths``);
  False for a config that is only compiled (``nextstep_jax.aot``) or inspected.
  """
  missing = _missing(config, SCHEMA)
  if missing:
    raise ConfigError("config is missing fields: " + ", ".join(missing))
  if paths:
    check_paths(config)
  ck = _Checks(config)
  _check_run(ck)
  _check_model(ck)
  _check_head_image_loss(ck)
  _check_optim(ck)
  _check_mesh_and_batch(ck, num_devices, num_granules)
  _check_checkpoint_and_lora(ck)
  _check_data(ck)
  _check_tokenizer_and_vae(ck)
  if ck.errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(ck.errors))


VAE_SCHEMA: dict[str, tuple[str, ...]] = _fields(vae_base_config())


def validate_vae(config: ml_collections.ConfigDict, num_devices: int) -> vae_lib.VAEConfig:
  """Checks a VAE trainer's config (the schema of ``vae_base_config``); returns its VAEConfig. Raises
  ConfigError listing every problem, each naming its field."""
  missing = [m for m in _missing(config, VAE_SCHEMA) if not m.startswith("vae.")]
  if missing:
    raise ConfigError("VAE config is missing fields: " + ", ".join(missing))
  try:
    cfg = vae_lib.VAEConfig.from_dict(config.vae.to_dict())
  except (ValueError, TypeError) as e:
    raise ConfigError(f"invalid VAE config: vae: {e}") from e
  ck = _Checks(config)
  t = config.train
  ck.positive("steps", "log_every", "eval_every", "checkpoint.every", "checkpoint.keep", "eval.batch_size")
  ck.non_negative("eval.num_images", "train.gamma", "train.l1_weight", "train.l2_weight", "train.kl_weight",
                  "train.adv_weight")
  ck.one_of("checkpoint.integrity", INTEGRITY_MODES)
  if config.data.batch_size < 1 or config.data.batch_size % num_devices:
    ck.err(f"data.batch_size={config.data.batch_size} must be a positive multiple of the "
           f"{num_devices} devices (data parallel)")
  if t.l1_weight == 0 and t.l2_weight == 0:
    ck.err("train.l1_weight and train.l2_weight are both 0: no reconstruction loss")
  if t.perceptual_weight != 0:
    ck.err("train.perceptual_weight must be 0: an LPIPS perceptual loss needs pretrained "
           "VGG/AlexNet and LPIPS weights, which cannot be downloaded in this "
           "environment (use l1/l2, and adv_weight for a from-scratch GAN term)")
  s = config.data.image_size
  if s % cfg.pixels_per_token:
    ck.err(f"data.image_size={s} is not divisible by {cfg.pixels_per_token} pixels per "
           f"token (VAE factor {cfg.factor} x patch size {cfg.patch_size})")
  if (config.data.source != "digits" and not storage.is_remote(config.data.source)
      and not os.path.isdir(config.data.source)):  # a URL is checked when it is staged
    ck.err(f"data.source={config.data.source!r} is neither 'digits' nor a directory (nor a gs:// / s3:// URL)")
  try:
    optim_lib.make_schedule(config.optim, config.steps)  # lr, schedule, warm-up
  except ValueError as e:
    ck.err(str(e))
  if ck.errors:
    raise ConfigError("invalid VAE config:\n  " + "\n  ".join(ck.errors))
  return cfg


HEAD_DISTILL_MIN_IMAGES = 10
HEAD_DISTILL_SCHEMA: dict[str, tuple[str, ...]] = _fields(head_distill_base_config())


def validate_head_distill(config: ml_collections.ConfigDict) -> None:
  """Checks a few-step head distillation config (``head_distill_base_config``); ConfigError listing every
  problem, each naming its field."""
  missing = _missing(config, HEAD_DISTILL_SCHEMA)
  if missing:
    raise ConfigError("head distillation config is missing fields: " + ", ".join(missing))
  ck = _Checks(config)
  if not config.teacher:
    ck.err("teacher is empty: give the trained run's work directory (--config.teacher=W)")
  elif not storage.is_remote(config.teacher) and not os.path.isdir(config.teacher):
    ck.err(f"teacher={config.teacher!r}: no such directory")
  ck.positive("evaluations", "teacher_steps", "time_shift", "num_images", "sample_batch", "train.steps",
              "train.batch_tokens", "train.log_every")
  ck.non_negative("cfg", "image_size", "train.rollout_weight")
  if int(config.evaluations) > int(config.teacher_steps):
    ck.err(f"evaluations={config.evaluations} is more than teacher_steps={config.teacher_steps}: nothing to distil")
  if config.prompts != "digits" and not os.path.isfile(config.prompts):
    ck.err(f"prompts={config.prompts!r} is neither 'digits' nor a file of captions")
  if int(config.num_images) < HEAD_DISTILL_MIN_IMAGES:
    ck.err(f"num_images={config.num_images} must be >= {HEAD_DISTILL_MIN_IMAGES} (a tenth is held out)")
  try:
    optim_lib.make_schedule(config.optim, int(config.train.steps))
  except ValueError as e:
    ck.err(str(e))
  if ck.errors:
    raise ConfigError("invalid head distillation config:\n  " + "\n  ".join(ck.errors))
