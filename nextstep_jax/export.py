"""Hugging Face export and import from the command line.

Export a run's newest (or a given) checkpoint as a NextStep-1 directory (SPEC §9):
  python -m nextstep_jax.export --workdir=W --out=DIR [--step=N] [--dtype=bfloat16]
      [--max_shard_size=5GB] [--tokenizer=PATH] [--vae=PATH]
The run's config comes from ``W/checkpoints/config.json`` (written by the trainer); the tokenizer
from --tokenizer, else the config's ``tokenizer.path``, else the demo tokenizer in ``W/tokenizer``;
the VAE from --vae, else the config's ``vae.checkpoint`` when set (copied into ``DIR/vae``).

Import a NextStep directory (ours, or an official NextStep-1 / NextStep-1.1 one as published: config.json,
safetensors, tokenizer/, vae/ with checkpoint.pt) as a run:
  python -m nextstep_jax.export --import_dir=DIR --out=W
      W/checkpoints/0 (params), W/checkpoints/config.json (every size from DIR/config.json), W/tokenizer,
      W/vae (safetensors); then ``sample --workdir=W``, ``export --workdir=W`` or ``checkpoint.init_from=W``.
Import a Qwen2.5 (Qwen2ForCausalLM) directory as the backbone of a params-only checkpoint:
  python -m nextstep_jax.export --import_dir=DIR --out=CKPT --qwen2 --config=configs/stage1.py
      the projectors and the head are freshly initialised from the experiment config (whose backbone
      sizes must match the checkpoint's).
Convert the official VAE's torch pickle to safetensors (needs torch; read with weights_only=True):
  python -m nextstep_jax.export --convert_vae=DIR/vae/checkpoint.pt --out=VAE_DIR
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import numpy as np

from nextstep_jax import cli
from nextstep_jax import overrides as overrides_lib
from nextstep_jax import parallel
from nextstep_jax.interop import hf, runs
from nextstep_jax.interop import vae as vae_interop


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
  p.add_argument("--convert_vae", default=None, help="an official vae/checkpoint.pt to write as safetensors")
  p.add_argument("--config", default=None, help="experiment config for --qwen2 (configs/<name>.py)")
  p.add_argument("--debug", action="store_true", help="show the full traceback of a user error (or set "
                 f"{cli.DEBUG_ENV}=1)")
  args = p.parse_args(argv)
  parallel.maybe_initialize_distributed()  # several processes (launch/local.sh, a pod): each reads its shards
  if sum(map(bool, (args.workdir, args.import_dir, args.convert_vae))) != 1:
    p.error("give exactly one of --workdir (export), --import_dir (import) or --convert_vae")
  if args.convert_vae:
    path = vae_interop.convert_checkpoint(args.convert_vae, args.out)
    print(f"wrote {path}")
    return
  if args.import_dir:
    config = None
    if args.config:
      config = overrides_lib.load_config(args.config)
    params = runs.import_to_checkpoint(args.import_dir, args.out, qwen2=args.qwen2, config=config,
                                       log=lambda line: print(line, file=sys.stderr, flush=True))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    what = "checkpoint" if args.qwen2 else "run"
    if jax.process_index() == 0:
      print(f"imported {n:,} parameters from {args.import_dir} into {what} {args.out} (step 0)")
    return
  index = runs.export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype,
                         max_shard_bytes=runs.parse_size(args.max_shard_size), tokenizer=args.tokenizer, vae=args.vae,
                         use_ema=not args.no_ema)
  files = sorted(set(index["weight_map"].values()))
  if jax.process_index() == 0:
    print(f"exported {len(index['weight_map'])} tensors ({index['metadata']['total_size']:,} bytes) in "
          f"{len(files)} shards to {args.out}")


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
