"""The paper's stage table, and the stage configs built from it.

``STAGES`` is SPEC §7 (the NextStep-1 paper's training table) as data and ``stage_config(name)`` applies
one stage row to the 14B backbone with the base head. The schema itself (every field and its default,
``base_config``) is ``nextstep_jax/config.py``; the size presets (``BACKBONES``, ``HEADS``) are
``nextstep_jax/models/presets.py``. Configs come back locked: assigning a key that does not exist raises.
"""

from __future__ import annotations

import ml_collections

from nextstep_jax.config import base_config
from nextstep_jax.models.presets import BACKBONES, HEADS, QWEN25_TIED_EMBEDDINGS  # noqa: F401  (the presets)

# ---------------------------------------------------------------------------------------------
# SPEC §7, the paper's training table, one row per stage. "16K"/"8K" sequence lengths are read
# as 16384/8192 tokens. Image areas are pixel counts (256**2 = 256x256), image tokens are
# per image (f8 VAE, patch 2: 16 px per token side). None = not given in the table.
# ---------------------------------------------------------------------------------------------
STAGES: dict[str, dict] = {
  "stage1": dict(
    min_lr=1e-4, lr=1e-4, schedule="constant", weight_decay=0.1,
    ce_weight=0.01, fm_weight=1.0, steps=200_000, warmup_steps=5_000, seq_len=16_384,
    image_area=(256**2, 256**2), image_tokens=(256, 256), training_tokens=1.23e12,
    ratios=dict(text=0.2, pair=0.6, edit=0.0, interleaved=0.2)),
  "stage2": dict(
    min_lr=1e-5, lr=1e-5, schedule="constant", weight_decay=0.1,
    ce_weight=0.01, fm_weight=1.0, steps=100_000, warmup_steps=5_000, seq_len=16_384,
    image_area=(256**2, 512**2), image_tokens=(256, 1024), training_tokens=0.61e12,
    ratios=dict(text=0.2, pair=0.6, edit=0.0, interleaved=0.2)),
  "anneal": dict(
    min_lr=0.0, lr=1e-5, schedule="cosine", weight_decay=0.1,
    ce_weight=0.01, fm_weight=1.0, steps=20_000, warmup_steps=0, seq_len=16_384,
    image_area=(256**2, 512**2), image_tokens=(256, 1024), training_tokens=40e9,
    ratios=dict(text=0.2, pair=0.6, edit=0.1, interleaved=0.1)),
  "sft": dict(
    min_lr=0.0, lr=1e-5, schedule="cosine", weight_decay=0.1,
    ce_weight=0.01, fm_weight=1.0, steps=10_000, warmup_steps=500, seq_len=8_192,
    image_area=(256**2, 512**2), image_tokens=(256, 1024), training_tokens=5e9,
    ratios=dict(text=0.0, pair=0.9, edit=0.1, interleaved=0.0)),
  # DPO (configs/dpo.py, nextstep_jax/dpo.py) reads its numbers from this row.
  "dpo": dict(
    min_lr=2e-6, lr=2e-6, schedule="constant", weight_decay=0.1,
    ce_weight=None, fm_weight=None, steps=300, warmup_steps=200, seq_len=None,
    image_area=(256**2, 512**2), image_tokens=(256, 1024), training_tokens=None,
    ratios=None),
}

# Global batch (rows) per stage. Not published: one row of `seq_len` tokens per rank, with the
# rank count chosen so rows * seq_len * steps comes within 5% of the table's training tokens
# (stage1: 384*16384*200K = 1.26T vs 1.23T; stage2 0.63T vs 0.61T; anneal 41.9B vs 40B;
# sft 5.24B vs 5B).
STAGE_BATCH_ROWS: dict[str, int] = {"stage1": 384, "stage2": 384, "anneal": 128, "sft": 64}


SIZES = ("14b", "tiny")


def stage_config(name: str, size: str | None = None) -> ml_collections.ConfigDict:
  """A SPEC §7 training stage (locked): by default (`size` "14b") on the Qwen2.5-14B backbone with the
  base FM head; ``size="tiny"`` runs the same code path (the stage's mixture, schedule kind, loss,
  pure FSDP, derived accumulation) at the demo's size on a CPU with the embedded digits
  (``--config=configs/stage2.py:tiny``).

  14b: bf16 compute with fp32 master weights, full rematerialisation, pure FSDP over every device,
  the global batch of ``STAGE_BATCH_ROWS`` rows split into micro-batches of one row per device
  (``data.micro_batch_per_device=1``, ``optim.grad_accum=0``: the accumulation steps follow the mesh).
  Data, tokenizer and VAE paths are left empty and are checked first: set them on the command line
  (``--config.data.source=... --config.tokenizer.path=... --config.vae.checkpoint=...``), and
  ``--config.checkpoint.init_from=<previous stage's checkpoint dir>`` for stages after stage1.
  """
  if name not in STAGE_BATCH_ROWS:
    raise KeyError(f"no config for stage {name!r}; stages with configs: {sorted(STAGE_BATCH_ROWS)}")
  size = size or "14b"
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r} for configs/{name}.py; sizes: {list(SIZES)} "
                     f"(e.g. --config=configs/{name}.py:tiny)")
  if size == "tiny":
    return _tiny_stage(name)
  row = STAGES[name]
  c = base_config("qwen2.5-14b", "base")
  c.workdir = f"runs/{name}"
  c.steps = row["steps"]
  c.log_every = 10
  c.eval_every = 1000

  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  # By platform: splash (Pallas) on TPU, cuDNN flash attention on NVIDIA GPUs, xla elsewhere;
  # name one of the model's implementations with --config.model.attention to override.
  c.model.attention = "auto"

  c.loss.ce_weight = row["ce_weight"]
  c.loss.fm_weight = row["fm_weight"]
  c.loss.ce_chunk = 2048          # 2048 x 152064 fp32 logits = 1.2 GB per row at a time
  c.optim.lr = row["lr"]
  c.optim.min_lr = row["min_lr"]
  c.optim.schedule = row["schedule"]
  c.optim.warmup_steps = row["warmup_steps"]
  c.optim.weight_decay = row["weight_decay"]

  c.mesh.axes = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.optim.grad_accum = 0              # derived: batch / (micro_batch_per_device * data-parallel devices)
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3

  min_tokens, max_tokens = row["image_tokens"]
  c.data.source = ""
  c.data.batch_size = STAGE_BATCH_ROWS[name]   # the global batch: the paper's token budget
  c.data.micro_batch_per_device = 1
  c.data.seq_len = row["seq_len"]
  c.data.ratios = ml_collections.ConfigDict(dict(row["ratios"]))
  c.data.image_size = int(round(row["image_area"][1] ** 0.5))   # largest side of the stage
  c.data.min_image_tokens = min_tokens
  c.data.max_image_tokens = max_tokens
  c.data.max_images = row["seq_len"] // min_tokens
  c.data.max_row_image_tokens = row["seq_len"]
  c.data.payload = "image_tokens"     # precomputed latents: sizes vary with the aspect buckets
  c.data.num_workers = 8

  c.tokenizer.kind = "hf"
  c.tokenizer.path = ""
  c.tokenizer.vocab_size = c.model.vocab_size
  c.vae.preset = "f8d16"
  c.lock()
  return c


def _tiny_stage(name: str) -> ml_collections.ConfigDict:
  """The stage's code path at the demo's size: tiny backbone and head, 128-token rows of 32x32 digits
  encoded by the demo VAE inside the step (set vae.checkpoint to a train_vae work directory), the
  stage's ratios, loss weights and schedule kind, pure FSDP with derived accumulation, fp32."""
  row = STAGES[name]
  c = base_config("tiny", "tiny")
  c.workdir = f"runs/{name}_tiny"
  c.steps = 20
  c.log_every = 1
  c.eval_every = 10
  c.model.attention = "auto"
  c.loss.ce_weight = row["ce_weight"]
  c.loss.fm_weight = row["fm_weight"]
  c.optim.lr = row["lr"]
  c.optim.min_lr = row["min_lr"]
  c.optim.schedule = row["schedule"]
  c.optim.warmup_steps = min(row["warmup_steps"], 2)
  c.optim.weight_decay = row["weight_decay"]
  c.optim.grad_accum = 0
  c.mesh.axes = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.checkpoint.every = 10
  c.checkpoint.keep = 2
  c.image.latent_channels = 4
  c.image.vae_factor = 4
  c.data.source = "digits"
  c.data.batch_size = 8
  c.data.micro_batch_per_device = 1
  c.data.seq_len = 128
  c.data.ratios = ml_collections.ConfigDict(dict(row["ratios"]))
  c.data.image_size = 32
  per_image = tokens_per_image(32, c.image.vae_factor, c.image.patch_size)
  c.data.min_image_tokens = c.data.max_image_tokens = per_image
  c.data.max_images = 5
  c.data.max_row_image_tokens = 5 * per_image
  c.data.payload = "images"
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.vocab_size = c.model.vocab_size
  c.vae.preset = "demo"
  if name == "sft":
    c.data.loss_on_prompt = False
  c.lock()
  return c


def tokens_per_image(image_size: int, vae_factor: int, patch_size: int) -> int:
  """Image tokens of a square image of `image_size` pixels (pixel path)."""
  side = image_size // (vae_factor * patch_size)
  return side * side
