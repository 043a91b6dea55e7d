"""Hugging Face export and import from the command line.

Export a run's newest (or a given) checkpoint as a NextStep-1 directory (SPEC §9):
  python -m nextstep_jax.export --workdir=W --out=DIR [--step=N] [--dtype=bfloat16]
      [--max_shard_size=5GB] [--tokenizer=PATH] [--vae=PATH]
The run's config comes from ``W/checkpoints/config.json`` (written by the trainer); the tokenizer
from --tokenizer, else the config's ``tokenizer.path``, else the demo tokenizer in ``W/tokenizer``;
the VAE from --vae, else the config's ``vae.checkpoint`` when set (copied into ``DIR/vae``).

Import a directory as a params-only checkpoint that ``checkpoint.init_from`` reads:
  python -m nextstep_jax.export --import_dir=DIR --out=CKPT
      NextStep-1 directory: every size from its config.json.
  python -m nextstep_jax.export --import_dir=DIR --out=CKPT --qwen2 --config=configs/stage1.py
      Qwen2.5 (Qwen2ForCausalLM) directory as the backbone; the projectors and the head are freshly
      initialised from the experiment config (whose backbone sizes must match the checkpoint's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nextstep_jax.interop import hf
from nextstep_jax.models import nextstep as ns


def parse_size(text: str) -> int:
  """'5GB', '500MB', '64KiB', '1024' -> bytes (decimal units for KB/MB/GB, binary for KiB/MiB/GiB)."""
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
  if not m:
    raise ValueError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or a byte count")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(m.group(1)) * scale)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config a run saved (``<workdir>/checkpoints/config.json``)."""
  path = os.path.join(workdir, "checkpoints", "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir with checkpoints?")
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _abstract_params(cfg: ns.NextStepConfig) -> dict:
  """ShapeDtypeStructs of the params, placed on the first local device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = nnx.eval_shape(lambda: ns.NextStep(cfg, rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def _find_tokenizer(workdir: str, config: Any, path: str | None):
  from nextstep_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  if path:
    return tok_lib.load_tokenizer(path)
  configured = config.get("tokenizer", {}).get("path", "") if hasattr(config, "get") else ""
  if configured:
    return tok_lib.load_tokenizer(configured)
  demo = os.path.join(workdir, "tokenizer")
  if os.path.isdir(demo):
    return tok_lib.load_tokenizer(demo)
  raise FileNotFoundError(f"no tokenizer: pass --tokenizer, set tokenizer.path in the config, or keep the demo "
                          f"tokenizer in {demo}")


def export_workdir(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
                   max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES, tokenizer: str | None = None,
                   vae: str | None = None, use_ema: bool = True) -> dict:
  """Writes the run's params (newest checkpoint, or `step`) as a NextStep-1 directory. Returns the index.

  use_ema: export the EMA weights when the run kept them (config.ema_decay > 0). A LoRA run
  (config.lora.rank > 0) is exported with its adapters merged into the frozen base.
  """
  from nextstep_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax import lora as lora_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  config = run_config(workdir)
  cfg = ns.NextStepConfig.from_config(config)
  src = os.path.join(workdir, "checkpoints")
  if step is not None:
    src = os.path.join(src, str(step))
  key = "ema" if use_ema and float(config.get("ema_decay", 0.0) or 0.0) > 0 else "params"
  lora_cfg = train_lib.lora_config(config)
  if lora_cfg is None:
    params = ckpt_lib.restore_params_from(src, _abstract_params(cfg), key=key)
  else:
    _, base_abstract, axes = train_lib.abstract_model(config)
    base = ckpt_lib.restore_params_from(src, base_abstract, key="base")
    adapters = ckpt_lib.restore_params_from(src, lora_lib.abstract_lora(base_abstract, axes, lora_cfg), key=key)
    params = lora_lib.merge_lora(base, adapters, lora_cfg)
  tok = _find_tokenizer(workdir, config, tokenizer)
  meta = hf.ImageMeta.from_config(config, tok)
  if vae is None:
    configured = config.get("vae", {}).get("checkpoint", "")
    vae = configured if configured and os.path.exists(configured) else None
  if vae is not None and os.path.isdir(os.path.join(vae, "export")):
    vae = os.path.join(vae, "export")  # a train_vae work directory: ship its exported weights
  return hf.export_nextstep(params, cfg, out, meta, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            tokenizer=tok, vae=vae)


def import_to_checkpoint(import_dir: str, out: str, *, qwen2: bool = False, config: Any = None) -> dict:
  """Reads a Hugging Face directory and saves its params as checkpoint step 0 in `out` (state
  ``{"params": ...}``, what ``checkpoint.restore_params_from`` reads). Returns the params."""
  from nextstep_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  if qwen2:
    if config is None:
      raise ValueError("--qwen2 needs --config (the experiment config sizing the head and projectors)")
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


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m nextstep_jax.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", help="training workdir to export")
  p.add_argument("--out", required=True, help="output directory (HF directory, or checkpoint with --import_dir)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--dtype", default="float32", choices=sorted(hf._EXPORT_DTYPES))  # pylint: disable=protected-access
  p.add_argument("--max_shard_size", default="5GB", help="largest shard, e.g. 5GB or 500MB")
  p.add_argument("--tokenizer", default=None, help="tokenizer directory or file to ship")
  p.add_argument("--vae", default=None, help="VAE directory or file to ship under vae/")
  p.add_argument("--no_ema", action="store_true", help="export the raw weights even when the run kept an EMA")
  p.add_argument("--import_dir", default=None, help="Hugging Face directory to import")
  p.add_argument("--qwen2", action="store_true", help="--import_dir is a Qwen2.5 checkpoint (backbone only)")
  p.add_argument("--config", default=None, help="experiment config for --qwen2 (configs/<name>.py)")
  args = p.parse_args(argv)
  if bool(args.workdir) == bool(args.import_dir):
    p.error("give exactly one of --workdir (export) or --import_dir (import)")
  if args.import_dir:
    config = None
    if args.config:
      from nextstep_jax import config as config_lib  # pylint: disable=import-outside-toplevel
      config = config_lib.load_config(args.config)
    params = import_to_checkpoint(args.import_dir, args.out, qwen2=args.qwen2, config=config)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"imported {n:,} parameters from {args.import_dir} into checkpoint {args.out} (step 0)")
    return
  index = export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype,
                         max_shard_bytes=parse_size(args.max_shard_size), tokenizer=args.tokenizer, vae=args.vae,
                         use_ema=not args.no_ema)
  files = sorted(set(index["weight_map"].values()))
  print(f"exported {len(index['weight_map'])} tensors ({index['metadata']['total_size']:,} bytes) in "
        f"{len(files)} shards to {args.out}")


if __name__ == "__main__":
  main(sys.argv[1:])
