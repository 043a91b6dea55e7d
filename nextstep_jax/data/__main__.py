"""The data command: your own images and texts -> the ArrayRecord records training reads.

  python -m nextstep_jax.data prepare --input=PATH [--input=PATH ...] --out=ROOT [--kind=pair]
      [--format=auto] [--config=configs/<stage>.py] [--split=train] [--small=upscale]
      [--vae=VAE_DIR [--latent_batch=16] [--latent_dtype=float16]]
      [--shard_size=1000] [--process_index=I --process_count=N] [--overwrite] ...

then ``python -m nextstep_jax.train --config=... --config.data.source=ROOT`` (with --vae, the
records carry the VAE's latent tokens too: ``--config.data.payload=image_tokens``, no VAE in the
step; without, ``--config.data.payload=images --config.vae.checkpoint=VAE_DIR``). Inputs (the
format is told from the path unless --format): a folder of images with ``.txt`` captions; a jsonl
of records of --kind (pair, edit, interleaved, text) or a csv index of image paths and captions;
webdataset tar shards, plain or in the official NextStep layout; ``tfds:NAME`` (a prepared TFDS
dataset, read as ArrayRecord, never downloaded). Images are fitted into the aspect buckets of
--config's area range (or of --unit, --min_image_tokens, --max_image_tokens). Progress goes to
stderr, the summary (kept and skipped records per reason, naming the first offending files) to
stdout and to ROOT/prepare-KIND-SPLIT.json. --vae (a train_vae work directory or an exported
VAE directory, as vae.checkpoint takes it) encodes every fitted image on this process's devices, in
batches of --latent_batch images of one bucket shape, and writes the per-channel mean and std of
the stored tokens to ROOT/latent_stats.json. Run the same command again to resume (with the same
VAE); several processes (or hosts) each convert their own share of the shards. Details:
nextstep_jax/data/prepare.py, formats.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from nextstep_jax import cli
from nextstep_jax import overrides as overrides_lib
from nextstep_jax import run as run_lib
from nextstep_jax import vae_tokens
from nextstep_jax.data import formats
from nextstep_jax.data import prepare as prepare_lib
from nextstep_jax.data import sources
from nextstep_jax.errors import UserError

PROG = "python -m nextstep_jax.data"
# Without --config: the stage configs' token unit (vae_factor 8 * patch 2) and area range.
DEFAULT_UNIT, DEFAULT_MIN_TOKENS, DEFAULT_MAX_TOKENS = 16, 256, 1024


def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog=PROG, description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True, metavar="prepare")
  q = sub.add_parser("prepare", help="convert inputs into ROOT (the data.source of training)",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  q.add_argument("--input", action="append", required=True,
                 help="a folder, .jsonl, .csv, .tar (globs allowed) or tfds:NAME; repeatable")
  q.add_argument("--out", required=True, help="the data root to write (data.source of training)")
  q.add_argument("--kind", default="pair", choices=sources.KINDS, help="records to write")
  q.add_argument("--format", default="auto", choices=("auto",) + formats.FORMATS)
  q.add_argument("--split", default="train", help="the split to write (train or heldout)")
  q.add_argument("--config", default=None,
                 help="a training config (configs/<name>.py[:arg]) whose image buckets to fit")
  q.add_argument("--unit", type=int, default=None,
                 help=f"pixels per token side (default: the config's, else {DEFAULT_UNIT})")
  q.add_argument("--min_image_tokens", type=int, default=None,
                 help="smallest image area in tokens (default: the config's, else "
                 f"{DEFAULT_MIN_TOKENS})")
  q.add_argument("--max_image_tokens", type=int, default=None,
                 help="largest image area in tokens (default: the config's, else "
                 f"{DEFAULT_MAX_TOKENS})")
  q.add_argument("--small", default="upscale", choices=sources.SMALL_POLICIES,
                 help="images below the smallest area: resized up into a bucket, or skipped")
  q.add_argument("--image_format", default="jpeg", choices=("jpeg", "png"))
  q.add_argument("--quality", type=int, default=95, help="JPEG quality")
  q.add_argument("--max_pixels", type=int, default=sources.DEFAULT_MAX_PIXELS,
                 help="larger images are skipped before decoding")
  q.add_argument("--image_root", default=None,
                 help="jsonl/csv image paths are relative to it (default: the index file's folder)")
  q.add_argument("--image_key", default=None, help="the image field (jsonl, csv, tfds)")
  q.add_argument("--caption_key", default=None, help="the caption field (jsonl, csv, tfds)")
  q.add_argument("--text_key", default=None, help="the text field of --kind=text (jsonl, tfds)")
  q.add_argument("--tfds_split", default="train", help="the split of a tfds: input to read")
  q.add_argument("--tfds_data_dir", default=None, help="where tfds: inputs are prepared")
  q.add_argument("--vae", default=None,
                 help="a VAE (train_vae work directory or exported VAE directory): store its "
                 "latent tokens of every image too, for data.payload=image_tokens")
  q.add_argument("--latent_batch", type=int, default=16,
                 help="images per VAE call, split over this process's devices")
  q.add_argument("--latent_dtype", default="float16", choices=formats.LATENT_DTYPES,
                 help="how the latent tokens are stored")
  q.add_argument("--shard_size", type=int, default=1000,
                 help="input records per shard (a webdataset tar is one shard)")
  q.add_argument("--process_index", type=int, default=None,
                 help="this process (default: JAX_PROCESS_ID or SLURM_PROCID, else 0)")
  q.add_argument("--process_count", type=int, default=None,
                 help="processes sharing the work (default: JAX_NUM_PROCESSES or SLURM_NTASKS, "
                 "else 1)")
  q.add_argument("--progress_every", type=float, default=10.0,
                 help="seconds between progress lines")
  q.add_argument("--overwrite", action="store_true",
                 help="replace what ROOT holds of this kind and split (one process only)")
  q.add_argument("--debug", action="store_true",
                 help=f"show the full traceback of a user error (or set {cli.DEBUG_ENV}=1)")
  return p


def _load_vae(path: str):
  if not os.path.isdir(path):
    raise UserError(f"--vae={path} is not a directory (a train_vae work directory or an exported "
                    "VAE directory)")
  try:
    return run_lib.load_vae(path)
  except (OSError, ValueError, KeyError) as e:   # no checkpoint, a bad config.json, ...
    raise UserError(f"--vae={path}: {cli.user_error_message(e)[len('error: '):]}") from e


def _latent_encoder(args, vae, unit: int, config) -> formats.LatentEncoder:
  """The --vae encoder, checked against the token unit and --config: one line naming the flag."""
  cfg = vae.config
  px = cfg.pixels_per_token
  if args.kind == "text":
    raise UserError("--vae with --kind=text: text records hold no images to encode")
  if unit != px:
    where = "--unit" if args.unit is not None else f"--config={args.config}"
    raise UserError(f"--vae={args.vae} makes a token of {px} px (factor {cfg.factor} x patch "
                    f"{cfg.patch_size}), but {where} asks {unit} px per token")
  if config is not None and (cfg.token_dim != int(config.image.token_dim) or
                             cfg.patch_size != int(config.image.patch_size)):
    raise UserError(f"--vae={args.vae} makes {cfg.token_dim}-d tokens with patch {cfg.patch_size}, "
                    f"--config={args.config} expects image.token_dim={config.image.token_dim} "
                    f"with patch {config.image.patch_size}")
  if unit % cfg.encode_multiple:
    raise UserError(f"--vae={args.vae}: its token norm covers {cfg.norm_patch}x{cfg.norm_patch} "
                    f"latent patches, which {unit} px tokens do not tile")
  if args.latent_batch < 1:
    raise UserError(f"--latent_batch={args.latent_batch} must be positive")
  return formats.LatentEncoder(
      encode=vae_tokens.pixel_encoder(vae), batch_size=args.latent_batch,
      patch_size=cfg.patch_size, identity=vae_tokens.vae_identity(vae), dtype=args.latent_dtype)


def _convert_options(args) -> formats.ConvertOptions:
  unit, lo, hi, config = DEFAULT_UNIT, DEFAULT_MIN_TOKENS, DEFAULT_MAX_TOKENS, None
  vae = _load_vae(args.vae) if args.vae else None
  if args.config:
    config = overrides_lib.load_config(args.config)
    unit = int(config.image.vae_factor) * int(config.image.patch_size)
    lo, hi = int(config.data.min_image_tokens), int(config.data.max_image_tokens)
  elif vae is not None:
    unit = vae.config.pixels_per_token
  unit = args.unit if args.unit is not None else unit
  lo = args.min_image_tokens if args.min_image_tokens is not None else lo
  hi = args.max_image_tokens if args.max_image_tokens is not None else hi
  if unit < 1 or args.shard_size < 1:
    raise UserError(f"--unit ({unit}) and --shard_size ({args.shard_size}) must be positive")
  try:
    sides = sources.area_sides(lo, hi)
  except ValueError as e:
    raise UserError(f"--min_image_tokens / --max_image_tokens: {e}") from e
  latents = _latent_encoder(args, vae, unit, config) if vae is not None else None
  return formats.ConvertOptions(unit=unit, sides=sides, max_pixels=args.max_pixels,
                                small=args.small, image_format=args.image_format,
                                quality=args.quality, latents=latents)


def prepare(args) -> None:
  index, count = prepare_lib.process_from_env()
  index = args.process_index if args.process_index is not None else index
  count = args.process_count if args.process_count is not None else count
  job = prepare_lib.Job(args.out, args.split, index, count, args.progress_every, args.overwrite)
  options = _convert_options(args)
  keys = {k: v for k, v in (("image", args.image_key), ("caption", args.caption_key),
                            ("text", args.text_key)) if v}
  source = formats.open_inputs(args.input, args.kind, args.format, shard_size=args.shard_size,
                               image_root=args.image_root, keys=keys, tfds_split=args.tfds_split,
                               tfds_data_dir=args.tfds_data_dir)
  summary = prepare_lib.prepare(source, job, options)
  if summary is None:
    print(f"process {index} of {count}: its shards are written; the last process to finish "
          "writes the dataset and the summary")
    return
  for line in prepare_lib.describe(summary, args.out):
    print(line)
  present = sources.available_kinds(args.out)
  hint = "" if len(present) == len(sources.KINDS) else " --config.data.renormalize=True"
  train = (f"python -m nextstep_jax.train --config=configs/<stage>.py "
           f"--config.data.source={args.out}")
  if args.vae:
    print(f"kinds in {args.out}: {', '.join(present)}; train on their latents: {train} "
          f"--config.data.payload=image_tokens{hint}")
  else:
    print(f"kinds in {args.out}: {', '.join(present)}; train on their pixels: {train} "
          f"--config.data.payload=images --config.vae.checkpoint=<VAE>{hint}")


def main(argv: Sequence[str]) -> None:
  args = _parser().parse_args(argv)
  try:
    prepare(args)
  except KeyboardInterrupt:
    print("interrupted: the same command run again resumes (finished shards are kept)",
          file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  cli.run(main, absl_flags=False)
