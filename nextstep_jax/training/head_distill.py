"""A few-step flow-matching head, distilled from a trained run's head with the backbone frozen.

  python -m nextstep_jax.distill --config=configs/head_distill_demo.py [--config.teacher=W --config.evaluations=4]

The teacher is the run's guided Euler ODE: ``teacher_steps`` head evaluations per token on the grid
``flow.ode_grid`` at guidance scale ``cfg`` (the sampler ``evaluate`` judges by default). The student, a
copy of the head started from the teacher's weights, learns to take the same trajectory in K
(``evaluations``) Euler steps: the student's grid is ``ode_grid(K, time_shift)``, and the teacher runs M =
ceil(teacher_steps / K) of its own steps inside each of the student's, so for K dividing teacher_steps its
points are exactly the teacher's grid. For a start noise x0 and the teacher's points X_0 = x0, X_1, ..., X_K
on the student's grid, the loss is the mean over the K segments of

  || guide(v_student(X_k, t_k)) - (X_{k+1} - X_k) / (t_{k+1} - t_k) ||^2

(the student's guided velocity at the start of a segment against the teacher's average velocity over it:
a segment-wise, progressive-style distillation in one stage), plus ``rollout_weight`` times the squared
error of the student's own K-step rollout against X_K. guide is the sampler's 2-way guidance at ``cfg``
(``flow.guide``), so a student evaluation is, as the teacher's, one head call on the conditional and the
negative row. The conditions come from the run itself: the teacher samples images for the prompts
(the digit captions, or a text file of them), and the backbone, fed those images back (teacher forcing,
the sampler's own layers), gives every token's conditional and negative hidden state. Every step draws
fresh start noise from ``fold_in(key(seed), step)``, and the pool and the batches come from the seed, so
a run is deterministic. A held-out tenth of the pool's images measures the student's K-step token against
the teacher's (relative error) at the end.

Output: ``sampling.few_step`` writes ``head.safetensors`` and ``head.json`` (``out``, default
``<teacher>/heads/k<K>``; a teacher URL is read from its local mirror, ``run.local_run``, and the head, written
there, is uploaded to ``<teacher>/heads/k<K>`` too); ``python -m nextstep_jax.sample --head=DIR`` and
``python -m nextstep_jax.evaluate --head=DIR`` sample with it.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import run as run_lib
from nextstep_jax import storage
from nextstep_jax import vae_tokens
from nextstep_jax.config import UserError
from nextstep_jax.data import digits as digits_lib
from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling import few_step, layout, prompts as prompts_lib
from nextstep_jax.sampling import flow
from nextstep_jax.sampling.flow import ode_grid
from nextstep_jax.sampling.sampler import sample_images
from nextstep_jax.training import optim as optim_lib
from nextstep_jax.training import trainer as trainer_lib

HELDOUT_EVERY = 10  # every 10th image of the pool is held out


# ---------------------------------------------------------------------------------------------
# The conditions: the run's own hidden states along its own samples
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_conditions(graphdef, state, tokens_bp, mask_bp, image_btd):
  """The head's condition ``image_out(h)`` (B, T, D) for each of T image tokens of a prompt row fed its
  own tokens back: the hidden state before token i, over the sampler's layers (``layout.decode``)."""
  model = nnx.merge(graphdef, state)
  b, p = tokens_bp.shape
  t, d = image_btd.shape[1], image_btd.shape[2]
  ids = jnp.concatenate([tokens_bp, jnp.zeros((b, t - 1), tokens_bp.dtype)], axis=1)
  mask = jnp.concatenate([mask_bp.astype(jnp.int32), jnp.ones((b, t - 1), jnp.int32)], axis=1)
  seq = jnp.concatenate([jnp.zeros((b, p, d), jnp.float32), image_btd[:, :t - 1].astype(jnp.float32)], axis=1)
  is_image = jnp.concatenate([jnp.zeros((b, p), bool), jnp.ones((b, t - 1), bool)], axis=1)
  # The sampled tokens go in as the sampler feeds them back (already normed when use_norm): image_in only.
  x = model.embed_inputs(ids, seq, is_image)
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = layout.init_cache(model.config.backbone, b, p + t - 1)
  hs, _ = layout.decode(model.config.backbone, layout.decoder_layout(model), x, pos, mask, cache)
  return model.image_out(hs[:, p - 1:p - 1 + t]).astype(jnp.float32)


def token_conditions(model: ns.NextStep, prompt: prompts_lib.Prompt, tokens_btd) -> np.ndarray:
  """float32 (B, T, D): the condition the head sees for each image token of `tokens_btd` (B, T, d) sampled
  after the left-padded `prompt` (B, P)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_token_conditions(graphdef, state, jnp.asarray(prompt.tokens), jnp.asarray(prompt.mask),
                                      jnp.asarray(tokens_btd)))


def condition_pool(model: ns.NextStep, tokenizer, texts, h: int, w: int, key: jax.Array, *, cfg: float,
                   steps: int, time_shift: float, use_norm: bool, batch_size: int, pad_id: int,
                   log=None) -> np.ndarray:
  """Conditions (N, T, 2, D) float32, [conditional, negative] for each token of each image: the hidden states
  along the teacher's ODE samples of `texts` (negative prompt ""), `batch_size` per call, image n from
  ``fold_in(key, n)``."""
  conds = []
  for start in range(0, len(texts), batch_size):
    chunk = list(texts[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)  # one compiled shape for every call
    cond, neg = prompts_lib.image_prompts(tokenizer, chunk, h, w, negative="")
    keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(start, start + batch_size))
    tokens = sample_images(model, cond, neg, h, w, keys, cfg=cfg, steps=steps, time_shift=time_shift,
                           use_norm=use_norm, sde=False, pad_id=pad_id)
    c = token_conditions(model, cond, tokens)
    u = token_conditions(model, neg, tokens)
    conds.append(np.stack([c, u], axis=2)[:real])
    if log:
      log(f"conditions: {min(start + batch_size, len(texts))}/{len(texts)} teacher images")
  return np.concatenate(conds)


# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------

def guided_velocity(head, x_bd, t, cond_b2c, cfg):
  """The sampler's 2-way guided velocity (``flow.guided_velocity``) for conditions (B, 2, D): the
  conditional and the negative row of each token, v_u + cfg (v_c - v_u). x (B, d) -> (B, d) fp32."""
  rows = jnp.concatenate([cond_b2c[:, 0], cond_b2c[:, 1]], axis=0)
  return flow.guided_velocity(head, x_bd, t, rows, groups=2, cfg=cfg, cfg_img=1.0)


def teacher_points(head, x0, cond_b2c, *, k: int, sub: int, cfg, time_shift) -> jax.Array:
  """(K + 1, B, d): the teacher's Euler ODE on ``ode_grid(K * sub)`` from x0, kept at every `sub`-th grid
  point: the K + 1 points of the student's grid ``ode_grid(K)`` (the shift acts on the uniform grid, so
  for K * sub = N these are points of the N-step grid)."""
  t = ode_grid(k * sub, time_shift)
  xs = [x0]
  for seg in range(k):
    def step(j, x, seg=seg):
      i = seg * sub + j
      return x + (t[i + 1] - t[i]) * guided_velocity(head, x, t[i], cond_b2c, cfg)
    xs.append(jax.lax.fori_loop(0, sub, step, xs[-1]))
  return jnp.stack(xs)


def student_rollout(head, x0, cond_b2c, *, k: int, cfg, time_shift) -> jax.Array:
  """The student's K-step token from x0: ``flow.integrate``'s Euler ODE, as the sampler computes it."""
  return flow.integrate(lambda x, t: guided_velocity(head, x, t, cond_b2c, cfg), x0, None, steps=k,
                        time_shift=time_shift)


def distill_loss(head, points, cond_b2c, *, k: int, cfg, time_shift, rollout_weight: float):
  """(loss, (segment loss, rollout loss)) for the teacher's points (K + 1, B, d)."""
  t = ode_grid(k, time_shift)
  seg = []
  for i in range(k):
    target = (points[i + 1] - points[i]) / (t[i + 1] - t[i])
    v = guided_velocity(head, points[i], t[i], cond_b2c, cfg)
    seg.append(jnp.mean(jnp.sum((v - target) ** 2, axis=-1)))
  seg_loss = jnp.mean(jnp.stack(seg))
  if rollout_weight:
    x = student_rollout(head, points[0], cond_b2c, k=k, cfg=cfg, time_shift=time_shift)
    roll = jnp.mean(jnp.sum((x - points[k]) ** 2, axis=-1))
  else:
    roll = jnp.zeros((), jnp.float32)
  return seg_loss + rollout_weight * roll, (seg_loss, roll)


# ---------------------------------------------------------------------------------------------
# The training
# ---------------------------------------------------------------------------------------------

def prompt_texts(c: ml_collections.ConfigDict) -> list[str]:
  """``num_images`` captions: the digit captions (every template and digit, in turn) for "digits", else
  the lines of the text file ``prompts`` (cycled)."""
  if c.prompts == "digits":
    base = [digits_lib.caption(t, d) for t in range(len(digits_lib.CAPTION_TEMPLATES))
            for d in range(digits_lib.NUM_CLASSES)]
  else:
    if not os.path.isfile(c.prompts):
      raise FileNotFoundError(f"prompts={c.prompts}: no such file (a text file of captions, one per line, or 'digits')")
    with open(c.prompts, encoding="utf-8") as f:
      base = [line.strip() for line in f if line.strip()]
    if not base:
      raise UserError(f"prompts={c.prompts}: the file holds no captions")
  return [base[i % len(base)] for i in range(int(c.num_images))]


def output_dir(c: ml_collections.ConfigDict) -> str:
  return c.out or os.path.join(c.teacher, "heads", f"k{int(c.evaluations)}")


def _optimizer(optim_items: tuple, steps: int) -> optax.GradientTransformation:
  return optim_lib.make_optimizer(ml_collections.ConfigDict(dict(optim_items)), steps)[0]


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=(
    "graphdef", "optim_items", "steps", "k", "sub", "cfg", "time_shift", "rollout_weight", "batch", "token_dim"))
def _train_step(student, opt_state, teacher, conds, key, *, graphdef, optim_items, steps, k, sub, cfg, time_shift,
                rollout_weight, batch, token_dim):
  """One update of the student (its params and optimizer state donated); the teacher's points from fresh
  start noise drawn from `key`. Static arguments (hashable: the optimizer's fields as a tuple) let runs with
  the same settings share one compilation."""
  x0 = jax.random.normal(key, (batch, token_dim), jnp.float32)
  points = jax.lax.stop_gradient(teacher_points(nnx.merge(graphdef, teacher), x0, conds, k=k, sub=sub, cfg=cfg,
                                                time_shift=time_shift))

  def loss_fn(params):
    return distill_loss(nnx.merge(graphdef, params), points, conds, k=k, cfg=cfg, time_shift=time_shift,
                        rollout_weight=rollout_weight)

  (loss, (seg, roll)), grads = jax.value_and_grad(loss_fn, has_aux=True)(student)
  updates, opt_state = _optimizer(optim_items, steps).update(grads, opt_state, student)
  return optax.apply_updates(student, updates), opt_state, {"loss": loss, "segment": seg, "rollout": roll,
                                                             "grad_norm": trainer_lib.global_norm(grads)}


def relative_error(graphdef, teacher, student, conds, key, *, k, sub, cfg, time_shift, batch: int = 512) -> dict:
  """The student's K-step token against the teacher's N-step one on held-out conditions (each token's
  start noise from `key`): relative RMS error, and the teacher's own K-step token's for comparison."""
  token_dim = nnx.merge(graphdef, teacher).config.token_dim

  @jax.jit
  def one(conds, key):
    x0 = jax.random.normal(key, (conds.shape[0], token_dim), jnp.float32)
    ref = teacher_points(nnx.merge(graphdef, teacher), x0, conds, k=k, sub=sub, cfg=cfg, time_shift=time_shift)[-1]
    s = student_rollout(nnx.merge(graphdef, student), x0, conds, k=k, cfg=cfg, time_shift=time_shift)
    naive = student_rollout(nnx.merge(graphdef, teacher), x0, conds, k=k, cfg=cfg, time_shift=time_shift)
    return jnp.sum((s - ref) ** 2), jnp.sum((naive - ref) ** 2), jnp.sum(ref ** 2)

  tot = np.zeros(3)
  for i in range(0, len(conds), batch):
    part = conds[i:i + batch]
    tot += np.asarray(jax.device_get(one(jnp.asarray(part), jax.random.fold_in(key, i))), np.float64)
  return {"student_relative_error": float(math.sqrt(tot[0] / tot[2])),
          "teacher_k_step_relative_error": float(math.sqrt(tot[1] / tot[2])), "heldout_tokens": int(len(conds))}


def distill_head(c: ml_collections.ConfigDict, log=print) -> dict[str, Any]:
  """Distils the head of the run ``c.teacher`` (config: ``config.head_distill_base_config``); writes the
  few-step head to ``output_dir(c)`` and returns its metadata."""
  config_lib.validate_head_distill(c)
  source = str(c.teacher) if storage.is_remote(c.teacher) else os.path.abspath(c.teacher)
  remote = c.teacher if storage.is_remote(c.teacher) and not c.out else None
  if storage.is_remote(c.teacher):  # read from its local mirror; the head is uploaded beside the run
    c = c.copy_and_resolve_references()
    with c.unlocked():
      c.teacher = run_lib.local_run(c.teacher)
  out = output_dir(c)
  if os.path.exists(os.path.join(out, few_step.META_FILE)) and not c.overwrite:
    raise UserError(f"{out} already holds a few-step head: pass --config.overwrite=True to replace it, or "
                    "--config.out=DIR")
  t_start = time.perf_counter()
  say = (lambda msg: log(f"[distill] {msg}")) if log else (lambda msg: None)
  run = run_lib.load_run(c.teacher)
  model, tokenizer, vae = run.model, run.tokenizer, run.vae
  size = int(c.image_size or run.config.data.image_size)
  h, w = vae_tokens.token_grid(vae.config, size, size)
  k, n = int(c.evaluations), int(c.teacher_steps)
  sub = -(-n // k)
  key = jax.random.key(int(c.seed))
  say(f"teacher {c.teacher} (step {run.step}): {n}-step guided ODE (cfg {c.cfg}, shift {c.time_shift}) -> "
      f"{k} evaluations ({sub} teacher steps per student step), {h}x{w} tokens per image")

  t0 = time.perf_counter()
  texts = prompt_texts(c)
  conds = condition_pool(model, tokenizer, texts, h, w, jax.random.fold_in(key, 0), cfg=float(c.cfg),
                         steps=n, time_shift=float(c.time_shift), use_norm=bool(c.use_norm),
                         batch_size=min(int(c.sample_batch), len(texts)), pad_id=int(tokenizer.pad_id),
                         log=say)
  held = np.arange(len(conds)) % HELDOUT_EVERY == HELDOUT_EVERY - 1
  train_c = conds[~held].reshape(-1, 2, conds.shape[-1])
  held_c = conds[held].reshape(-1, 2, conds.shape[-1])
  say(f"{len(texts)} teacher images -> {len(train_c)} training and {len(held_c)} held-out token conditions "
      f"in {time.perf_counter() - t0:.1f} s")

  graphdef, teacher = nnx.split(model.head)
  student = jax.tree.map(jnp.array, teacher)  # a copy the step may donate
  steps = int(c.train.steps)
  optim_items = tuple(sorted(c.optim.to_dict().items()))
  tx, schedule = optim_lib.make_optimizer(c.optim, steps)
  opt_state = tx.init(student)
  batch = int(c.train.batch_tokens)
  step_fn = functools.partial(_train_step, graphdef=graphdef, optim_items=optim_items, steps=steps, k=k, sub=sub,
                              cfg=float(c.cfg), time_shift=float(c.time_shift),
                              rollout_weight=float(c.train.rollout_weight), batch=batch,
                              token_dim=model.config.token_dim)
  rng = np.random.default_rng(int(c.seed))
  t0 = time.perf_counter()
  first = None
  history = []
  for s in range(steps):
    idx = rng.integers(0, len(train_c), size=batch)
    student, opt_state, m = step_fn(student, opt_state, teacher, jnp.asarray(train_c[idx]),
                                    jax.random.fold_in(jax.random.fold_in(key, 1), s))
    if s == 0:
      jax.block_until_ready(m["loss"])
      first = time.perf_counter() - t0
      t0 = time.perf_counter()
    if s == 0 or (s + 1) % int(c.train.log_every) == 0 or s + 1 == steps:
      m = {name: float(v) for name, v in jax.device_get(m).items()}
      if not all(math.isfinite(v) for v in m.values()):
        raise FloatingPointError(f"step {s + 1}: non-finite distillation loss {m}")
      rate = f"{(time.perf_counter() - t0) / s * 1e3:.0f} ms/step" if s else f"first step {first:.1f} s (compiles)"
      history.append(dict(step=s + 1, **m))
      say(f"step {s + 1}/{steps} | loss {m['loss']:.5f} | segment {m['segment']:.5f} | rollout {m['rollout']:.5f} | "
          f"grad_norm {m['grad_norm']:.3f} | lr {float(schedule(s)):.2e} | {rate}")
  train_s = time.perf_counter() - t0 + (first or 0.0)
  errors = relative_error(graphdef, teacher, student, held_c, jax.random.fold_in(key, 2), k=k, sub=sub,
                          cfg=float(c.cfg), time_shift=float(c.time_shift))
  say(f"held-out tokens: student {k}-step relative error {errors['student_relative_error']:.4f} against the "
      f"teacher's {n}-step token (the teacher's own {k}-step token: {errors['teacher_k_step_relative_error']:.4f})")
  meta = {"evaluations": k, "cfg": float(c.cfg), "time_shift": float(c.time_shift), "use_norm": bool(c.use_norm),
          "teacher_steps": n, "teacher_steps_per_evaluation": sub, "teacher": source,
          "teacher_checkpoint_step": int(run.step), "image_size": size, "num_images": len(texts),
          "prompts": c.prompts, "seed": int(c.seed), "train_steps": steps, "batch_tokens": batch,
          "rollout_weight": float(c.train.rollout_weight), "train_seconds": train_s,
          "total_seconds": time.perf_counter() - t_start, "history": history, **errors}
  few_step.save_head(out, nnx.merge(graphdef, student), meta)
  if remote:
    mirror = storage.RemoteWorkdir(remote, steps_dir=run_lib.CHECKPOINTS)
    rel = os.path.relpath(out, mirror.local).replace(os.sep, "/")
    for name in (few_step.HEAD_FILE, few_step.META_FILE):
      mirror.upload(f"{rel}/{name}")
    say(f"uploaded to {remote}/{rel}")
  say(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")
  return few_step.read_meta(out)
