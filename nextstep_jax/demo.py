"""The whole chain on the embedded digits, from nothing to samples and an evaluation:

  python -m nextstep_jax.demo --workdir=runs/demo

1. the demo VAE (configs/vae_demo.py) trained with latent noise on 4,500 real digits -> W/vae;
2. the demo tokenizer (sentencepiece on the digit captions and stdlib docstrings) -> W/tokenizer;
3. the NextStep transformer (configs/demo.py: text, image-text, editing and interleaved data, the
   frozen VAE encoding pixels inside the step) -> W/checkpoints, metrics in W/metrics.jsonl and TensorBoard;
4. the evaluation: a digit classifier trained on the real training split, a grid of samples for every
   digit ("a handwritten digit d"), prompt-following accuracy, Fréchet distance in the classifier's
   feature space, the VAE's PSNR/SSIM -> W/eval.json, W/samples_grid.png.
Each stage resumes from what is already in the work directory, so a rerun continues where it stopped.
Flags: --vae_steps, --steps (transformer), --per_digit (samples per digit for the evaluation).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  from nextstep_jax import startup  # stdlib only: in place before the heavy imports below
  startup.exit_on_interrupt()

import json
import time

from absl import flags, logging

from configs import demo as demo_config
from configs import vae_demo
from nextstep_jax import cli
from nextstep_jax.evaluation import digits
from nextstep_jax.training import loop, vae_trainer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "output directory")
flags.DEFINE_integer("vae_steps", -1, "VAE training steps (-1: the config's)")
flags.DEFINE_integer("steps", -1, "transformer training steps (-1: the config's)")
flags.DEFINE_integer("per_digit", 20, "generated samples per digit for the evaluation")
flags.DEFINE_float("cfg", 3.0, "classifier-free guidance scale for the evaluation samples")


def _stopped(stage: str, workdir: str) -> dict:
  reason = loop.StopSignal.last_reason
  print(f"[demo] stopped ({reason}) while training {stage}; rerun the same command to resume from "
        f"{workdir}", flush=True)
  return {"stopped": reason}


def run(workdir: str, vae_steps: int = -1, steps: int = -1, per_digit: int = 20, cfg: float = 3.0) -> dict:
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  vae_dir = os.path.join(workdir, "vae")
  vcfg = vae_demo.get_config()
  if vae_steps >= 0:
    vcfg.steps = vae_steps
  print(f"[demo] 1/3 VAE -> {vae_dir}", flush=True)
  t0 = time.perf_counter()
  loop.StopSignal.last_reason = ""
  vae_trainer.train_and_evaluate(vcfg, vae_dir)
  t_vae = time.perf_counter() - t0
  if loop.StopSignal.last_reason:
    return _stopped("the VAE", workdir)

  cfg_lm = demo_config.get_config()
  with cfg_lm.unlocked():
    cfg_lm.workdir = workdir
    cfg_lm.vae.checkpoint = vae_dir
    if steps >= 0:
      cfg_lm.steps = steps
      cfg_lm.optim.warmup_steps = min(cfg_lm.optim.warmup_steps, steps)
  print(f"[demo] 2/3 transformer ({cfg_lm.steps} steps) -> {workdir}", flush=True)
  t0 = time.perf_counter()
  loop.train(cfg_lm, workdir)
  t_lm = time.perf_counter() - t0
  if loop.StopSignal.last_reason:
    return _stopped("the transformer", workdir)

  print(f"[demo] 3/3 evaluation ({per_digit} samples per digit)", flush=True)
  t0 = time.perf_counter()
  result = digits.evaluate_run(workdir, per_digit=per_digit, cfg=cfg)
  t_eval = time.perf_counter() - t0
  timing = {"vae_s": t_vae, "transformer_s": t_lm, "eval_s": t_eval, "total_s": time.perf_counter() - t_start}
  result["timing"] = timing
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2, default=float)
  print("[demo] " + json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))},
                               default=float), flush=True)
  print(f"[demo] done in {timing['total_s'] / 60:.1f} min: {workdir}/eval.json, {workdir}/samples_grid.png",
        flush=True)
  return result


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  run(FLAGS.workdir, FLAGS.vae_steps, FLAGS.steps, FLAGS.per_digit, FLAGS.cfg)


if __name__ == "__main__":
  cli.run(main)
