"""Sample images from a trained run:

  python -m nextstep_jax.sample --workdir=W --prompt="a handwritten digit 7" --num=4 --out=DIR
  python -m nextstep_jax.sample --workdir=W --prompt="a handwritten digit 7" --num=64 --batch=16     # 4 calls
  python -m nextstep_jax.sample --workdir=W --prompt="invert the colours" --image=in.png --out=DIR   # editing
  python -m nextstep_jax.sample --workdir=W --unconditional --num=4                                 # no caption
  python -m nextstep_jax.sample --workdir=W --prompt="a handwritten digit 7" --head=W/heads/k4      # few-step head

Text-to-image uses two rows per sample (prompt, negative prompt) with guidance on the flow-matching head;
editing uses three ([image + instruction, image + negative, negative only]) with ``--cfg`` and
``--cfg_img`` and the editing time shift. The defaults are the official pipeline's documented usage:
the SDE head sampler, 50 steps, cfg 7.5 (cfg_img 2.0 for editing), use_norm, a constant schedule,
time shift 1.0 for text-to-image and 3.2 for editing. Writes one PNG per sample and ``grid.png``, and prints the
time per image (the first call includes compilation; it is reported apart). ``--batch`` images go into
one sampler call; image n draws its noise from ``fold_in(key(seed), n)``, so the images do not depend on
``--batch``. A mistake in the flags (an
empty prompt, a negative guidance scale, a prompt longer than the run's context, a missing image) is
answered with one ``error:`` line and exit status 2 before anything compiles.
"""

from __future__ import annotations

from absl import flags, logging

from nextstep_jax import cli
from nextstep_jax.sampling.runner import sample_run

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training work directory (checkpoints, tokenizer, config)")
flags.DEFINE_string("prompt", "", "the caption, or the editing instruction with --image (required unless "
                    "--unconditional)")
flags.DEFINE_bool("unconditional", False, "sample without a caption: one empty-prompt row per sample, no guidance")
flags.DEFINE_string("negative", "", "negative prompt (the unconditional row)")
flags.DEFINE_string("image", "", "source image for editing (PNG/JPEG)")
flags.DEFINE_float("cfg", 7.5, "classifier-free guidance on the text, >= 0 (1: none; v_neg + cfg * (v - v_neg))")
flags.DEFINE_float("cfg_img", 2.0, "guidance on the source image (editing), >= 0 (1: none)")
flags.DEFINE_integer("steps", 50, "flow-matching head steps per token (>= 2 for the SDE, >= 1 for the ODE)")
flags.DEFINE_float("time_shift", -1.0, "time-grid shift s (-1: 1.0 for text-to-image, 3.2 for editing)")
flags.DEFINE_bool("sde", True, "the official Euler-Maruyama head sampler (--nosde: the Euler ODE)")
flags.DEFINE_bool("use_norm", True, "layer-normalise every sampled token before it is fed back and decoded")
flags.DEFINE_enum("cfg_schedule", "constant", ["constant", "linear"], "guidance per token: constant, or "
                  "decaying linearly towards 1 over the image (the official pipeline's options)")
flags.DEFINE_string("mesh", "", "axis=size pairs, e.g. fsdp=2,tensor=4 (data takes the rest): the params are "
                    "restored sharded on that mesh and the sampler runs under it (default: the run's config.mesh "
                    "when there are several devices)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "weights and backbone compute dtype (the head's "
                  "integration and guidance stay fp32)")
flags.DEFINE_integer("num", 4, "images to sample (>= 1)")
flags.DEFINE_integer("batch", 0, "images per sampler call (0: all --num in one); the images do not depend on it")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_integer("size", 0, "image side in pixels (0: the config's data.image_size)")
flags.DEFINE_bool("use_ema", True, "use the EMA weights when the run kept them")
flags.DEFINE_integer("step", -1, "checkpoint step (-1: newest)")
flags.DEFINE_string("out", "", "output directory (default: W/samples)")
flags.DEFINE_string("head", "", "a few-step head directory (python -m nextstep_jax.distill): samples with its "
                    "weights and the settings it was distilled for (its K steps, cfg, time shift; the ODE)")
# What a few-step head fixes (head.json): these flags cannot be given with --head.
HEAD_FIXES = ("steps", "cfg", "sde", "time_shift", "use_norm", "cfg_schedule")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  clash = [f"--{n}" for n in HEAD_FIXES if FLAGS.head and FLAGS[n].present]
  if clash:
    raise cli.UserError(f"--head={FLAGS.head} samples with the settings it was distilled for (its head.json): "
                        f"drop {', '.join(clash)}")
  sample_run(FLAGS.workdir, FLAGS.prompt, out=FLAGS.out, num=FLAGS.num, image=FLAGS.image, negative=FLAGS.negative,
      cfg=FLAGS.cfg, cfg_img=FLAGS.cfg_img, steps=FLAGS.steps, time_shift=FLAGS.time_shift, sde=FLAGS.sde,
      seed=FLAGS.seed, size=FLAGS.size, use_ema=FLAGS.use_ema, step=None if FLAGS.step == -1 else FLAGS.step,
      unconditional=FLAGS.unconditional, use_norm=FLAGS.use_norm, cfg_schedule=FLAGS.cfg_schedule,
      dtype=FLAGS.dtype, mesh=FLAGS.mesh, batch=FLAGS.batch, head=FLAGS.head)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
