"""Input pipeline throughput per host, against what one stage2 step consumes per host.

  python benchmarks/data.py [--jpegs=200] [--batches=12] [--workers=0] [--digit_batches=300]

1. Digits: the demo (configs/demo.py: 8 rows x 128 tokens, 32 px images, pixel path), which the
   loader must outrun (the demo step takes ~50-100 ms).
2. The real-image path: --jpegs 512x512 JPEGs (smooth random colour fields with grain, written with
   PIL into a temporary directory, ~40-80 KB each at q90), prepared with the data command's library
   (``formats.open_inputs`` + ``prepare.prepare``, as ``python -m nextstep_jax.data prepare`` runs
   it) twice: pixel records, and records with the latents of a tiny VAE of the stage's token shape
   (f8, 16 channels, patch 2: 16 px and 64 values per token, 1,024 tokens per 512 px image; 8 base
   channels, so it encodes quickly on a CPU: the encoding rate printed is not the f8d16 VAE's).
   Then the training iterator (``data/mixture.build_train_iterator``, what training/loop.py reads)
   reads them with configs/stage2.py's data settings (16,384-token rows, 256..1024-token buckets),
   pairs only (data.renormalize), on the pixel path (data.payload=images, data.max_images=16, the
   most 512 px images a row holds, as validation demands) and on the latent path
   (data.payload=image_tokens, as the stage configs ship). Rows per batch: --rows (the host's
   share of a step is printed as a multiple of it). The tokenizer is the demo's sentencepiece
   model (the stage's Qwen2.5 tokenizer.json is not shipped): captions tokenize differently, the
   image tokens (~97% of a row here) are the same.
3. What a host must deliver: stage2's global batch (384 rows x 16,384 tokens) over the hosts of a
   v5p-64 slice (8 hosts, 32 chips: the first row of README's AOT table), at the step time that
   ``training/flops.step_flops(stage2)`` implies at --mfu (40%) of the v5p bf16 peak
   (``flops.PEAK_FLOPS``). The AOT table gives memory, not time, hence the stated MFU.

One process here stands for one host (its grain workers: --workers). Prints figures, asserts
nothing. Pins itself to the first two CPUs when the machine has more.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import demo, stage2  # noqa: E402
from nextstep_jax import vae_tokens  # noqa: E402
from nextstep_jax.data import formats as F  # noqa: E402
from nextstep_jax.data import mixture as M  # noqa: E402
from nextstep_jax.data import prepare as P  # noqa: E402
from nextstep_jax.data import tokenizer as T  # noqa: E402
from nextstep_jax.models import vae as vae_lib  # noqa: E402
from nextstep_jax.training import flops as flops_lib  # noqa: E402

SLICE, CHIPS, HOSTS = "v5p-64", 32, 8   # README's AOT table, first row; docs/scale.md: 8 hosts
# A VAE of the stage's token shape, small enough to encode hundreds of 512 px images on a CPU.
TINY_F8 = vae_lib.VAEConfig(base_channels=8, channel_mults=(1, 2, 2, 2), num_res_blocks=1,
                            latent_channels=16, mid_attention=False, norm_groups=4, patch_size=2)


def _config(base: ml_collections.ConfigDict, workdir: str, **data) -> ml_collections.ConfigDict:
  """A copy of a real config (the schema's fields, the config's values) with data fields set."""
  c = ml_collections.ConfigDict(base.to_dict())
  c.workdir = workdir
  c.data.update(data)
  return c


def _measure(config, tok, batches: int) -> dict:
  """Times `batches` batches after the first; rates over the emitted batches."""
  t0 = time.perf_counter()
  it = M.build_train_iterator(config, tok)
  next(it)
  t1 = time.perf_counter()
  before = dict(it.counters)
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t1
  after = it.counters
  it.close()

  def delta(prefix: str) -> int:
    return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix))
  tokens, samples = delta("tokens"), delta("samples/")   # samples: packed, a few not yet emitted
  return dict(startup_s=t1 - t0, ms_per_batch=1000 * dt / batches, tokens_per_s=tokens / dt,
              samples_per_s=samples / dt, tokens_per_sample=tokens / max(samples, 1),
              fill=tokens / (batches * config.data.batch_size * config.data.seq_len),
              skipped=delta("skipped/"))


def _jpeg_folder(folder: str, n: int, size: int = 512) -> None:
  """Smooth random colour fields with noise, each with a caption."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for i in range(n):
    a = rng.uniform(0, 6, size=(3, 4))
    img = np.stack([np.sin(a[c, 0] * xx + a[c, 1] * yy + a[c, 2]) * 0.5 + 0.5
                    for c in range(3)], -1)
    img = np.clip(img * 255 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
      f.write(f"a colourful abstract pattern number {i}, smooth waves with grain")


def _prepare(folder: str, root: str, options: F.ConvertOptions) -> tuple[dict, float]:
  t = time.perf_counter()
  summary = P.prepare(F.open_inputs([folder]), P.Job(root, progress_every=1e9), options,
                      log=lambda _: None)
  return summary, time.perf_counter() - t


def _need() -> dict:
  """What one host of the slice must deliver (module doc, 3)."""
  c = stage2.get_config()
  flops = flops_lib.step_flops(c)
  return dict(flops=flops, tokens_per_step=c.data.batch_size * c.data.seq_len / HOSTS,
              rows_per_step=c.data.batch_size / HOSTS)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--jpegs", type=int, default=200)
  parser.add_argument("--batches", type=int, default=12, help="timed batches per real-image run")
  parser.add_argument("--rows", type=int, default=2, help="16,384-token rows per batch")
  parser.add_argument("--digit_batches", type=int, default=300, help="0: skip the digits")
  parser.add_argument("--workers", default="0", help="comma-separated data.num_workers values")
  parser.add_argument("--latent_batch", type=int, default=8, help="images per VAE call")
  parser.add_argument("--mfu", type=float, default=0.40)
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
  print(f"CPUs used: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
  workers = [int(w) for w in args.workers.split(",") if w != ""]
  need = _need()
  step_s = need["flops"] / (CHIPS * flops_lib.PEAK_FLOPS["tpu v5p"] * args.mfu)
  need_tokens_s = need["tokens_per_step"] / step_s
  print(f"stage2 on {SLICE} ({CHIPS} chips, {HOSTS} hosts): {need['flops']:.3e} FLOPs per step "
        f"(training/flops.py) -> {step_s:.1f} s per step at {args.mfu:.0%} MFU of "
        f"{flops_lib.PEAK_FLOPS['tpu v5p'] / 1e12:.0f} TFLOP/s per chip; per host "
        f"{need['rows_per_step']:.0f} rows = {need['tokens_per_step']:,.0f} tokens per step = "
        f"{need_tokens_s:,.0f} tokens/s")

  with tempfile.TemporaryDirectory() as tmp:
    tok = T.build_demo_tokenizer(tmp, 512)
    if args.digit_batches:
      for w in workers:
        r = _measure(_config(demo.get_config(), tmp, num_workers=w), tok, args.digit_batches)
        print(f"digits (configs/demo.py) workers={w}: {r['ms_per_batch']:.1f} ms/batch, "
              f"{r['samples_per_s']:,.0f} samples/s, {r['tokens_per_s']:,.0f} tokens/s, "
              f"fill {r['fill']:.3f}, startup {r['startup_s']:.1f} s")

    folder = os.path.join(tmp, "jpegs")
    t = time.perf_counter()
    _jpeg_folder(folder, args.jpegs)
    kb = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
             if n.endswith(".jpg")) / args.jpegs / 1024
    print(f"{args.jpegs} JPEGs of 512x512 ({kb:.0f} KB each) written in "
          f"{time.perf_counter() - t:.1f} s")
    fit = dict(unit=16, sides=(16, 32))   # stage2: 16 px per token, 256..1024 tokens
    vae = vae_lib.build_vae(TINY_F8)
    latents = F.LatentEncoder(vae_tokens.pixel_encoder(vae), args.latent_batch, 2,
                              vae_tokens.vae_identity(vae))
    roots = {"pixel": os.path.join(tmp, "pixels"), "latent": os.path.join(tmp, "latents")}
    for path, options in (("pixel", F.ConvertOptions(**fit)),
                          ("latent", F.ConvertOptions(**fit, latents=latents))):
      summary, dt = _prepare(folder, roots[path], options)
      print(f"prepare ({path} records): {summary['records']} of {summary['read']} kept in "
            f"{dt:.1f} s ({summary['records'] / dt:.1f} images/s, one process), "
            f"{summary['bytes'] / summary['records'] / 1024:.0f} KB per record")

    base = stage2.get_config()
    for path in ("pixel", "latent"):
      payload = dict(pixel=dict(payload="images", max_images=16),
                     latent=dict(payload="image_tokens"))[path]
      for w in workers:
        cfg = _config(base, tmp, source=roots[path], renormalize=True, batch_size=args.rows,
                      num_workers=w, **payload)
        r = _measure(cfg, tok, args.batches)
        print(f"stage2 rows, {path} path, workers={w}: {r['ms_per_batch']:,.0f} ms per batch of "
              f"{args.rows} x {cfg.data.seq_len:,}, {r['samples_per_s']:.1f} samples/s, "
              f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_sample']:.0f} per sample), fill "
              f"{r['fill']:.3f}, startup {r['startup_s']:.1f} s; per host "
              f"{r['tokens_per_s'] / need_tokens_s:.2f}x what a stage2 step consumes "
              f"({need_tokens_s:,.0f} tokens/s = {need_tokens_s / r['tokens_per_sample']:.1f} "
              "samples/s)")


if __name__ == "__main__":
  main()
