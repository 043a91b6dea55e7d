"""Input pipeline throughput on 2 CPU cores: samples/s and tokens/s for the embedded digits and
for a folder of 512x512 JPEGs (generated in a temporary directory, converted to ArrayRecord).

  python benchmarks/data.py [--batches=300] [--jpegs=256] [--workers=0,2]

Digits: the demo's data settings (8 rows x 128 tokens, 32 px images on the pixel path, ratios
text 0.1 / pair 0.6 / edit 0.1 / interleaved 0.2); the loader must outrun the demo train step
(~50-100 ms per step). JPEGs: converted once (the conversion rate is printed too), then read on
the pixel path with 512 px buckets (1024 tokens per image), 4 rows x 4096 tokens. Prints figures,
asserts nothing. Pins itself to the first two CPUs when the machine has more.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from nextstep_jax.data import mixture as M  # noqa: E402
from nextstep_jax.data import formats as F  # noqa: E402
from nextstep_jax.data import tokenizer as T  # noqa: E402


def _config(workdir, **data):
  import ml_collections  # pylint: disable=import-outside-toplevel
  d = dict(source="digits", batch_size=8, seq_len=128,
           ratios=dict(text=0.1, pair=0.6, edit=0.1, interleaved=0.2), image_size=32,
           min_image_tokens=16, max_image_tokens=16, max_images=5, max_row_image_tokens=80,
           drop_text_prob=0.3, payload="images", num_workers=0, seed=0)
  d.update(data)
  return ml_collections.ConfigDict(dict(
      seed=0, workdir=workdir, data=d,
      image=dict(latent_channels=4, patch_size=2, vae_factor=4, token_dim=16),
      tokenizer=dict(kind="sentencepiece", path="", vocab_size=512)))


def _measure(config, tok, batches: int) -> dict:
  t0 = time.perf_counter()
  it = M.build_train_iterator(config, tok)
  first = next(it)
  t1 = time.perf_counter()
  del first
  for _ in range(batches):
    next(it)
  t2 = time.perf_counter()
  c = it.counters
  it.close()
  samples = sum(v for k, v in c.items() if k.startswith("samples/"))
  # Counters include the first batch and packed-but-not-emitted samples: scale to emitted batches.
  per_batch = c["tokens"] / c["batches"]
  dt = t2 - t1
  return dict(startup_s=t1 - t0, ms_per_batch=1000 * dt / batches,
              samples_per_s=samples / c["batches"] * batches / dt,
              tokens_per_s=per_batch * batches / dt,
              fill=per_batch / (config.data.batch_size * config.data.seq_len),
              skipped=sum(v for k, v in c.items() if k.startswith("skipped/")))


def _jpeg_folder(folder: str, n: int, size: int = 512) -> None:
  """Smooth random colour fields with noise: JPEG-sized like photos (~40-80 KB at q90)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for i in range(n):
    a = rng.uniform(0, 6, size=(3, 4))
    img = np.stack([np.sin(a[c, 0] * xx + a[c, 1] * yy + a[c, 2]) * 0.5 + 0.5 for c in range(3)], -1)
    img = np.clip(img * 255 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
      f.write(f"a colourful abstract pattern number {i}, smooth waves with grain")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=300)
  parser.add_argument("--jpeg_batches", type=int, default=40)
  parser.add_argument("--jpegs", type=int, default=256)
  parser.add_argument("--workers", default="0,2", help="comma-separated data.num_workers values")
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
  print(f"CPUs used: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
  workers = [int(w) for w in args.workers.split(",") if w != ""]
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    tok = T.build_demo_tokenizer(tmp, 512)
    print(f"demo tokenizer built in {time.perf_counter() - t:.1f} s (vocab {tok.vocab_size})")
    for w in workers:
      r = _measure(_config(tmp, num_workers=w), tok, args.batches)
      print(f"digits  8x128 px32 workers={w}: {r['ms_per_batch']:.1f} ms/batch, "
            f"{r['samples_per_s']:.0f} samples/s, {r['tokens_per_s']:.0f} tokens/s, "
            f"fill {r['fill']:.3f}, startup {r['startup_s']:.1f} s")

    folder = os.path.join(tmp, "jpegs")
    os.makedirs(folder)
    t = time.perf_counter()
    _jpeg_folder(folder, args.jpegs)
    print(f"generated {args.jpegs} JPEGs of 512x512 in {time.perf_counter() - t:.1f} s")
    root = os.path.join(tmp, "records")
    t = time.perf_counter()
    counters = F.convert_image_folder(folder, root, F.ConvertOptions(unit=16, sides=(16, 32)))
    dt = time.perf_counter() - t
    print(f"converted to ArrayRecord: {counters['written']} images in {dt:.1f} s "
          f"({counters['written'] / dt:.0f} images/s), counters {dict(counters)}")
    for w in workers:
      cfg = _config(tmp, source=root, ratios=dict(pair=1.0), image_size=512, seq_len=4096,
                    batch_size=4, min_image_tokens=256, max_image_tokens=1024, max_images=4,
                    max_row_image_tokens=4096, num_workers=w)
      cfg.image.vae_factor = 8
      r = _measure(cfg, tok, args.jpeg_batches)
      print(f"jpeg512 4x4096 px512 workers={w}: {r['ms_per_batch']:.1f} ms/batch, "
            f"{r['samples_per_s']:.0f} samples/s (= images/s), {r['tokens_per_s']:.0f} tokens/s, "
            f"fill {r['fill']:.3f}, startup {r['startup_s']:.1f} s")


if __name__ == "__main__":
  main()
