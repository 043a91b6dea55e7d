"""Few-step heads against their teacher on the digits: prompt accuracy and Fréchet distance against K.

  python benchmarks/few_step.py --workdir=runs/demo --heads=runs/demo/heads/k2,runs/demo/heads/k4 \
      [--seeds=0,1,2 --per_digit=50]

For every seed, ``per_digit`` samples of each digit with "a handwritten digit d" (500 per seed at 50),
judged by the run's digit classifier (``nextstep_jax.evaluation.digits``: prompt accuracy; Fréchet
distance in the judge's features against the 500 held-out real digits; the real-vs-real floor at the same
sample size), for:
  teacher SDE      the official sampler (Euler–Maruyama), teacher_steps evaluations per token;
  teacher ODE      the guided Euler ODE the heads were distilled from, teacher_steps evaluations;
  teacher ODE K    the same head with only K evaluations (what K steps give without distillation);
  few-step K       each head of --heads (its K, cfg and time shift from its head.json).
Every sampler runs at the heads' guidance scale and time shift, batch_size prompts per call; s/image is
the mean over the seeds after a first, compiling call (prompts, sampler, VAE decode); the batch-1 column is
the median over latency_images calls of the compiled sampler alone with one image (its prompt and negative
row), after a compiling call; all in this one process. The verdict lines compare each head with the
teacher ODE: prompt accuracy within 0.03 and Fréchet distance within 15% (means over the seeds). Never
asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="the trained run (its classifier is kept in WORKDIR/classifier)")
  ap.add_argument("--heads", required=True, help="comma-separated few-step head directories")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--per_digit", type=int, default=50)
  ap.add_argument("--batch_size", type=int, default=100)
  ap.add_argument("--latency_images", type=int, default=20,
                  help="timed one-image sampler calls for the batch-1 column (0: skip)")
  ap.add_argument("--out", default="", help="also write the figures as JSON here")
  a = ap.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from nextstep_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax.data import digits as digits_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax.evaluation import classifier as clf_lib  # pylint: disable=import-outside-toplevel
  from nextstep_jax.evaluation import digits as ev  # pylint: disable=import-outside-toplevel
  from nextstep_jax.evaluation.frechet import frechet_distance  # pylint: disable=import-outside-toplevel
  from nextstep_jax import sampling, vae_tokens  # pylint: disable=import-outside-toplevel
  from nextstep_jax.sampling import few_step  # pylint: disable=import-outside-toplevel

  seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  heads = [h for h in a.heads.split(",") if h.strip()]
  metas = [few_step.read_meta(h) for h in heads]
  cfg, shift = metas[0]["cfg"], metas[0]["time_shift"]
  n_teacher = metas[0]["teacher_steps"]
  for h, m in zip(heads, metas):
    if (m["cfg"], m["time_shift"], m["teacher_steps"]) != (cfg, shift, n_teacher):
      sys.exit(f"error: {h} was distilled at cfg {m['cfg']}, shift {m['time_shift']}, {m['teacher_steps']} teacher "
               f"steps; {heads[0]} at cfg {cfg}, shift {shift}, {n_teacher}: compare heads of one teacher setting")
  run = run_lib.load_run(a.workdir)
  judge, meta = clf_lib.load_or_train_classifier(os.path.join(a.workdir, ev.CLASSIFIER_DIR))
  size = int(run.config.data.image_size)
  gh, gw = vae_tokens.token_grid(run.vae.config, size, size)
  held_u8, _ = digits_lib.load_split("heldout")
  real = digits_lib.pad_digits_u8(held_u8, size)
  real_feats = clf_lib.features(judge, real)
  train_u8, train_y = digits_lib.load_split("train")
  digits = list(range(digits_lib.NUM_CLASSES))
  labels = ev.digit_labels(digits, a.per_digit)

  floors = []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(train_y == d), size=a.per_digit, replace=False) for d in digits])
    floors.append(frechet_distance(clf_lib.features(judge, digits_lib.pad_digits_u8(train_u8[idx], size)), real_feats))

  samplers = [("teacher SDE", run.model, n_teacher, True), ("teacher ODE", run.model, n_teacher, False)]
  for h, m in zip(heads, metas):
    k = m["evaluations"]
    samplers.append((f"teacher ODE {k}", run.model, k, False))
    samplers.append((f"few-step {k} ({os.path.basename(os.path.normpath(h))})", few_step.with_head(run.model, h)[0],
                     k, False))
  rows = []
  for name, model, steps, sde in samplers:
    accs, fds, secs = [], [], []
    for i, seed in enumerate([seeds[0]] + seeds):  # a first call compiles; it is not timed
      t0 = time.perf_counter()
      images = ev.generate_digits(model, run.config, run.tokenizer, run.vae, digits, a.per_digit, jax.random.key(seed),
                                  cfg, steps, batch_size=a.batch_size, time_shift=shift, sde=sde,
                                  use_norm=metas[0]["use_norm"], image_size=size)
      if i == 0:
        continue
      secs.append((time.perf_counter() - t0) / len(images))
      r = ev.evaluate_generated(judge, images, labels, real)
      accs.append(r["prompt_accuracy"])
      fds.append(r["frechet_distance"])
    latency = float("nan")
    if a.latency_images:  # the compiled sampler alone, one image (its prompt and negative row) per call
      cond, neg = sampling.image_prompts(run.tokenizer, [ev.PROMPT_TEMPLATE.format(d=3)], gh, gw, negative="")
      weights = sampling.sampler_weights(model)  # laid out once, as the sample command does
      one = lambda i: jax.block_until_ready(sampling.sample_images(
          weights, cond, neg, gh, gw, jax.random.key(i), cfg=cfg, steps=steps, time_shift=shift, sde=sde,
          use_norm=metas[0]["use_norm"], pad_id=run.tokenizer.pad_id))
      one(0)  # compiles
      times = []
      for i in range(a.latency_images):
        t0 = time.perf_counter()
        one(i + 1)
        times.append(time.perf_counter() - t0)
      latency = float(np.median(times))
    rows.append(dict(sampler=name, evaluations=steps, prompt_accuracy=accs, frechet_distance=fds,
                     seconds_per_image=float(np.mean(secs)), batch1_seconds_per_image=latency))
    print(f"{name}: {steps} evaluations, accuracy {np.mean(accs):.3f} {np.round(accs, 3).tolist()}, FD "
          f"{np.mean(fds):.2f} {np.round(fds, 2).tolist()}, {np.mean(secs) * 1e3:.2f} ms/image at batch "
          f"{a.batch_size}, {latency * 1e3:.2f} ms/image at batch 1", flush=True)

  print(f"\n{run.workdir} (step {run.step}); judge held-out accuracy {meta['heldout_accuracy']:.3f}; cfg {cfg}, "
        f"time shift {shift}; {len(labels)} samples per seed, seeds {seeds}; real-digit FD floor "
        f"{np.mean(floors):.2f}; {jax.devices()[0].platform}, batch {a.batch_size}\n")
  print("| sampler | head evaluations / token | prompt accuracy (mean; per seed) | Fréchet distance (mean; per seed) "
        f"| ms / image, batch {a.batch_size} | ms / image, batch 1 |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['sampler']} | {r['evaluations']} | {np.mean(r['prompt_accuracy']):.3f} "
          f"({', '.join(f'{v:.3f}' for v in r['prompt_accuracy'])}) | {np.mean(r['frechet_distance']):.1f} "
          f"({', '.join(f'{v:.1f}' for v in r['frechet_distance'])}) | {r['seconds_per_image'] * 1e3:.2f} | "
          f"{r['batch1_seconds_per_image'] * 1e3:.2f} |")
  teacher = rows[1]
  t_acc, t_fd = np.mean(teacher["prompt_accuracy"]), np.mean(teacher["frechet_distance"])
  print()
  for r in rows[2:]:
    if not r["sampler"].startswith("few-step"):
      continue
    acc, fd = np.mean(r["prompt_accuracy"]), np.mean(r["frechet_distance"])
    ok = abs(acc - t_acc) <= 0.03 and fd <= 1.15 * t_fd
    print(f"{r['sampler']}: accuracy {acc - t_acc:+.3f} against the teacher ODE (target within 0.03), FD "
          f"{fd / t_fd:.3f}x (target at most 1.15x): {'meets' if ok else 'misses'} the target")
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"rows": rows, "fd_floor": floors, "cfg": cfg, "time_shift": shift, "seeds": seeds,
                 "per_digit": a.per_digit}, f, indent=2)


if __name__ == "__main__":
  main()
