"""Model presets, the paper's stage table, and the full config schema.

Everything an experiment config (``configs/<name>.py:get_config()``) needs is built here:
``BACKBONES`` and ``HEADS`` are plain dicts of sizes, ``STAGES`` is SPEC §7 (the NextStep-1
paper's training table) as data, ``base_config()`` builds a ConfigDict holding every field of
the schema, and ``stage_config(name)`` applies one stage row to the 14B backbone with the base
head. Configs come back locked: assigning a key that does not exist raises.
"""

from __future__ import annotations

import ml_collections

from nextstep_jax.parallel import DEFAULT_RULES

# ---------------------------------------------------------------------------------------------
# Backbones: Qwen2.5-style decoders. The Qwen2.5 numbers are those of the published config.json
# of each checkpoint (rms_norm_eps is 1e-6 for 0.5B..7B and 1e-5 for 14B). Importers read the
# real numbers from the checkpoint; these presets size fresh models and abstract shapes.
# Note: the 0.5B, 1.5B and 3B checkpoints tie lm_head to embed_tokens
# (QWEN25_TIED_EMBEDDINGS); this project's model always has a separate lm_head, so an importer
# copies embed_tokens into lm_head for those.
# ---------------------------------------------------------------------------------------------


def _backbone(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, mlp: int,
              vocab: int, rope_theta: float, eps: float) -> dict:
  return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
              head_dim=head_dim, intermediate_size=mlp, vocab_size=vocab,
              rope_theta=rope_theta, rms_norm_eps=eps)


BACKBONES: dict[str, dict] = {
  # The demo backbone: about 0.9M parameters, trains on 2 CPU cores.
  "tiny": _backbone(128, 4, 4, 2, 32, 384, 512, 10_000.0, 1e-6),
  "qwen2.5-0.5b": _backbone(896, 24, 14, 2, 64, 4864, 151_936, 1e6, 1e-6),
  "qwen2.5-1.5b": _backbone(1536, 28, 12, 2, 128, 8960, 151_936, 1e6, 1e-6),
  "qwen2.5-3b": _backbone(2048, 36, 16, 2, 128, 11_008, 151_936, 1e6, 1e-6),
  "qwen2.5-7b": _backbone(3584, 28, 28, 4, 128, 18_944, 152_064, 1e6, 1e-6),
  "qwen2.5-14b": _backbone(5120, 48, 40, 8, 128, 13_824, 152_064, 1e6, 1e-5),
}

QWEN25_TIED_EMBEDDINGS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b")

# Flow-matching heads (MAR's SimpleMLPAdaLN), paper Table 4: residual blocks x width.
HEADS: dict[str, dict] = {
  "tiny": dict(num_layers=2, dim=128, batch_mul=4),
  "small": dict(num_layers=6, dim=1024, batch_mul=4),
  "base": dict(num_layers=12, dim=1536, batch_mul=4),
  "large": dict(num_layers=24, dim=2048, batch_mul=4),
}

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


def base_config(backbone: str = "tiny", head: str = "tiny") -> ml_collections.ConfigDict:
  """Every field of the config schema, sized by a backbone and a head preset (unlocked).

  Experiment configs start here, change what differs, and lock the result.
  """
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
    b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1))

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Across slices / nodes (DCN); with any size > 1, mesh.axes is per slice (nextstep_jax/parallel.py).
  c.mesh.dcn_axes = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.mesh.rules = DEFAULT_RULES

  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True, init_from=""))

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"
  c.data.batch_size = 8
  c.data.seq_len = 128
  c.data.ratios = ml_collections.ConfigDict(dict(text=0.2, pair=0.6, edit=0.0, interleaved=0.2))
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
  c.data.num_workers = 0
  c.data.seed = 0

  c.tokenizer = ml_collections.ConfigDict(dict(kind="sentencepiece", path="",
                                               vocab_size=c.model.vocab_size))
  c.vae = ml_collections.ConfigDict(dict(preset="f8d16", checkpoint=""))
  # LoRA (rank 0 = off): adapters on the named projections train, the base weights stay frozen.
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=32.0, targets=("q", "k", "v", "o"), head_targets=()))
  return c


def stage_config(name: str) -> ml_collections.ConfigDict:
  """A SPEC §7 training stage on the Qwen2.5-14B backbone with the base FM head (locked).

  bf16 compute with fp32 master weights, full rematerialisation, pure FSDP over every device.
  Data, tokenizer and VAE paths are left empty: set them on the command line
  (``--config.data.source=... --config.tokenizer.path=... --config.vae.checkpoint=...``), and
  ``--config.checkpoint.init_from=<previous stage's checkpoint dir>`` for stages after stage1.
  """
  if name not in STAGE_BATCH_ROWS:
    raise KeyError(f"no config for stage {name!r}; stages with configs: {sorted(STAGE_BATCH_ROWS)}")
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
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3

  min_tokens, max_tokens = row["image_tokens"]
  c.data.source = ""
  c.data.batch_size = STAGE_BATCH_ROWS[name]
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


def tokens_per_image(image_size: int, vae_factor: int, patch_size: int) -> int:
  """Image tokens of a square image of `image_size` pixels (pixel path)."""
  side = image_size // (vae_factor * patch_size)
  return side * side
