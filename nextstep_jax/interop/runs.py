"""A training run exported as a NextStep-1 Hugging Face directory, and such a directory (or a Qwen2.5 one)
imported as a params-only checkpoint that ``checkpoint.init_from`` reads (``python -m nextstep_jax.export``
is the command line)."""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import run as run_lib
from nextstep_jax.config import UserError
from nextstep_jax.interop import hf, safetensors_io
from nextstep_jax.models import nextstep as ns
from nextstep_jax.training import checkpoint as ckpt_lib


def parse_size(text: str) -> int:
  """'5GB', '500MB', '64KiB', '1024' -> bytes (decimal units for KB/MB/GB, binary for KiB/MiB/GiB)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
  if not m:
    raise UserError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or a byte count")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(m.group(1)) * scale)


def export_workdir(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
                   max_shard_bytes: int = safetensors_io.DEFAULT_SHARD_BYTES, tokenizer: str | None = None,
                   vae: str | None = None, use_ema: bool = True) -> dict:
  """Writes the run's params (newest good checkpoint, or `step`) as a NextStep-1 directory. Returns the index.

  use_ema: export the EMA weights when the run kept them (config.ema_decay > 0). A LoRA run
  (config.lora.rank > 0) is exported with its adapters merged into the frozen base. The tokenizer:
  `tokenizer`, else the config's ``tokenizer.path``, else the demo tokenizer in ``<workdir>/tokenizer``.
  """
  config = run_lib.saved_config(workdir)
  cfg = ns.NextStepConfig.from_config(config)
  src = run_lib.checkpoint_dir(workdir)
  if step is not None:
    src = os.path.join(src, str(step))
  _, params = run_lib.load_params(src, config, use_ema=use_ema, what=f"run {workdir}")
  tok = run_lib.load_tokenizer(config, workdir, path=tokenizer)
  meta = hf.ImageMeta.from_config(config, tok)
  if vae is None:
    configured = config.vae.checkpoint
    vae = configured if configured and os.path.exists(configured) else None
  if vae is not None and os.path.isdir(os.path.join(vae, run_lib.VAE_EXPORT_DIR)):
    vae = os.path.join(vae, run_lib.VAE_EXPORT_DIR)  # a train_vae work directory: ship its exported weights
  return hf.export_nextstep(params, cfg, out, meta, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            tokenizer=tok, vae=vae)


def import_to_checkpoint(import_dir: str, out: str, *, qwen2: bool = False, config: Any = None) -> dict:
  """Reads a Hugging Face directory and saves its params as checkpoint step 0 in `out` (state
  ``{"params": ...}``, what ``checkpoint.restore_params_from`` reads). Returns the params."""
  if qwen2:
    if config is None:
      raise UserError("--qwen2 needs --config (the experiment config sizing the head and projectors)")
    backbone = hf.import_qwen2_backbone(import_dir, config)
    model = ns.NextStep(ns.NextStepConfig.from_config(config), rngs=nnx.Rngs(params=int(config.seed)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["backbone"] = backbone
    saved_config = config
  else:
    cfg, _ = hf.read_nextstep_config(import_dir)
    params = hf.load_nextstep_params(import_dir, cfg)
    saved_config = None
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  ckpt = ckpt_lib.Checkpointer(out, every=1, keep=1, async_save=False, config=saved_config)
  try:
    ckpt.save(0, {"params": params}, force=True)
  finally:
    ckpt.close()
  return params
