"""The training loop: restore or init, the steps, the end-of-step policy, held-out eval, sample grids.

``train(config, workdir)`` reads top to bottom:
  1. parallel: jax.distributed (multi-host), the (data, fsdp, tensor) mesh, the logical rules;
  2. data: the tokenizer and the grain mixture of text / pair / edit / interleaved sources;
  3. model: the Trainer (training/trainer.py) builds it abstractly and derives its shardings; the
     state is restored, or initialised from another stage's params, or materialised sharded
     (``restore_or_init``, shared with DPO);
  4. step: ``trainer.step_fn`` (the jitted ``Trainer.train_step``, state donated);
  5. checkpoints: orbax, async, keep-N, with the data iterator's state; resume is exact;
  6. the loop: metrics to TensorBoard, metrics.jsonl and the console; ``LoopControl`` ends each
     step (non-finite streaks, saves, SIGTERM / SIGINT, preemption).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import parallel
from nextstep_jax import run as run_lib
from nextstep_jax import sampling
from nextstep_jax import vae_tokens
from nextstep_jax.batch import to_uint8
from nextstep_jax.data import images as images_lib
from nextstep_jax.data import mixture
from nextstep_jax.training import checkpoint as ckpt_lib
from nextstep_jax.training import flops as flops_lib
from nextstep_jax.training import lora as lora_lib
from nextstep_jax.training import metrics as metrics_lib
from nextstep_jax.training.metrics import log
from nextstep_jax.training.trainer import State, Trainer, count_params


def start(config, workdir: str | None) -> tuple[str, Any]:
  """Distributed start-up, the config checked against the devices, the mesh; returns (workdir, mesh)."""
  parallel.maybe_initialize_distributed()
  workdir = workdir or config.workdir
  config_lib.validate(config, num_devices=jax.device_count(), num_granules=parallel.num_granules())
  mesh = parallel.make_hybrid_mesh(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  log(f"devices {jax.device_count()} ({jax.default_backend()}), processes {jax.process_count()}, "
      f"mesh {dict(mesh.shape)}")
  return workdir, mesh


def restore_or_init(trainer: Trainer, ckpt: ckpt_lib.Checkpointer, data_iter, *, init_from: str,
                    required: str = "", what: str = "params") -> State:
  """The state to start from: the newest checkpoint step that passes its integrity check (unreadable
  newer steps are named in a warning and moved aside, never deleted; the data iterator resumes too),
  else fresh optimizer and step around ``init_from``'s params (with LoRA they become the frozen
  base), else a fresh state. `required`: when set, starting from nothing is refused with this text."""
  restored = ckpt.restore_latest_good(parallel.with_shardings(trainer.abstract_state,
                                                              trainer.state_shardings))
  if restored is not None:
    step, state, data_state = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    log(f"resumed from step {step}")
    return state
  if init_from:
    if trainer.lora is None:
      target = parallel.with_shardings(trainer.abstract_params, trainer.param_shardings)
    else:
      target = parallel.with_shardings(trainer.base_abstract, trainer.base_shardings)
    step, params = ckpt_lib.restore_params_step(init_from, target)
    log(f"{what} initialised from {init_from} (step {step})" if what != "params" else
        f"initialised params from {init_from} (step {step})")
    return trainer.state_from_params(params)
  if required:
    raise config_lib.ConfigError(required)
  return trainer.init_state(trainer.config.seed)


def train(config, workdir: str | None = None) -> dict[str, float]:
  """Runs (or resumes) training to ``config.steps``. Returns the last logged metrics."""
  # 1. parallel
  workdir, mesh = start(config, workdir)
  pidx, pcount = jax.process_index(), jax.process_count()

  # 2. data
  tokenizer = run_lib.load_tokenizer(config, workdir, build=True)
  data_iter = mixture.build_train_iterator(config, tokenizer, pidx, pcount)

  # 3. model, state, checkpoints
  trainer = Trainer(config, mesh, vae=run_lib.vae_encoder(config))
  log(f"parameters: {count_params(trainer.abstract_params):,}")
  ckpt = ckpt_lib.Checkpointer.from_config(config, os.path.join(workdir, run_lib.CHECKPOINTS))
  state = restore_or_init(trainer, ckpt, data_iter, init_from=config.checkpoint.init_from)
  step = int(state["step"])

  # 4-6. the loop
  writer = metrics_lib.MetricsWriter(workdir, pidx, console_every=config.log_every)
  timer = metrics_lib.StepTimer()
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_step = flops_lib.step_flops(config)
  device_kind = jax.devices()[0].device_kind
  eval_batches = None
  profile = profile_range(config.profile_steps)
  control = LoopControl(config, ckpt)
  last: dict[str, float] = {}
  data_wait = 0.0
  try:
    while step < config.steps:
      if profile and step == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      t0 = time.perf_counter()
      local = next(data_iter)
      data_wait += time.perf_counter() - t0
      batch = parallel.global_batch(local, mesh)
      state, metrics = trainer.step_fn(state, batch)
      step += 1
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        log(f"profile of steps {profile[0]}..{profile[1]} written to {workdir}/profile")
      streak = control.check_streak(step, state)
      if step % config.log_every == 0 or step == config.steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last.update(timer.lap(config.log_every, config.log_every * tokens_per_step))
        if last.get("step_time", 0.0) > 0:
          last["tflops_per_device"] = flops_lib.tflops_per_device(flops_per_step, last["step_time"],
                                                                  jax.device_count())
          mfu = flops_lib.mfu(flops_per_step, last["step_time"], jax.device_count(), device_kind)
          if mfu is not None:
            last["mfu"] = mfu
        last["data_wait_s"] = data_wait / config.log_every
        last["compute_s"] = last.get("step_time", 0.0) - last["data_wait_s"]
        last["skipped_steps"] = float(state["skipped"])
        data_wait = 0.0
        for k, v in data_iter.counters.items():
          if k.startswith("skipped") or k.startswith("converted"):
            last[f"data/{k}"] = float(v)
        writer.write_scalars(step, last)
      if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
        if eval_batches is None:
          eval_batches = mixture.build_eval_batches(config, tokenizer, int(config.eval_batches))
        evals = evaluate_heldout(trainer, state, eval_batches, mesh)
        writer.write_scalars(step, evals)
        if config.sample_prompts and trainer.vae is not None:
          grid = sample_grid(trainer, state, config, tokenizer)
          writer.write_images(step, "samples", grid)
      if control.save_or_stop(step, state, streak, data_iter.get_state):
        break
  finally:
    control.close()
    writer.close()
  return last


class LoopControl:
  """The end of every step of a training loop (train.train, dpo.train_dpo): the check on runs of
  non-finite steps, the periodic, final and on-signal saves, and the stop on SIGTERM or preemption."""

  def __init__(self, config, ckpt: ckpt_lib.Checkpointer):
    self.ckpt = ckpt
    self.final_step = int(config.steps)
    self.max_bad = int(config.max_skipped_steps)
    self.stop = StopSignal()

  def check_streak(self, step: int, state: State) -> int:
    """The current run of skipped (non-finite) updates; raises once it reaches max_skipped_steps."""
    streak = int(state["bad_streak"])
    if streak:
      log(f"step {step}: non-finite loss or gradients, update skipped ({streak} in a row)")
      if streak >= self.max_bad:
        raise FloatingPointError(
            f"{streak} consecutive non-finite steps (max_skipped_steps={self.max_bad}) at step {step}; "
            f"stopping. The last good checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory}")
    return streak

  def save_or_stop(self, step: int, state: State, streak: int, data_state: Callable[[], Any]) -> bool:
    """Saves when due; True when the loop must end now (a stop was requested, or preemption)."""
    ckpt, stop, final = self.ckpt, self.stop, step == self.final_step
    # No periodic save inside a run of skipped steps: retention must not push out the last
    # checkpoint written before it (a SIGTERM still saves: skipped steps leave params unchanged).
    if (not streak and (ckpt.should_save(step) or final)) or stop.requested:
      ckpt.save(step, state, data_state(), force=final or stop.requested)
    if stop.requested or ckpt.reached_preemption(step):
      ckpt.wait()
      log(f"stop requested ({stop.reason or 'preemption'}): saved step {step}, exiting")
      return True
    return False

  def close(self) -> None:
    self.stop.restore()
    self.ckpt.wait()
    self.ckpt.close()


class StopSignal:
  """SIGTERM (a preemption notice) or SIGINT asks the loop to save the current step and exit 0."""

  def __init__(self):
    self.requested = False
    self.reason = ""
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.reason = signal.Signals(signum).name

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def profile_range(spec: str) -> tuple[int, int] | None:
  if not spec:
    return None
  lo, hi = (int(x) for x in str(spec).split(","))
  return lo, hi


def evaluate_heldout(trainer: Trainer, state: State, eval_batches: dict, mesh) -> dict[str, float]:
  """CE and FM on the fixed held-out batches of each source (averaged over its batches)."""
  out: dict[str, float] = {}
  for name, batches in eval_batches.items():
    sums: dict[str, float] = {}
    for b in batches:
      base = (state["base"],) if "base" in state else ()
      m = jax.device_get(trainer.eval_fn(state["params"], parallel.global_batch(b, mesh), *base))
      for k in ("loss", "ce", "fm"):
        sums[k] = sums.get(k, 0.0) + float(m[k]) / len(batches)
    for k, v in sums.items():
      out[f"eval/{name}/{k}"] = v
  return out


def sample_grid(trainer: Trainer, state: State, config, tokenizer) -> np.ndarray:
  """Decoded samples of the config's fixed prompts as one uint8 grid (one image per prompt)."""
  params = state.get("ema", state["params"])
  if trainer.lora is not None:
    params = lora_lib.merge_lora(state["base"], params, trainer.lora)
  model = nnx.merge(trainer.graphdef, jax.device_get(params))
  side = config.data.image_size // (config.image.vae_factor * config.image.patch_size)
  cond, neg = sampling.image_prompts(tokenizer, list(config.sample_prompts), side, side)
  tokens = sampling.sample_images(model, cond, neg, side, side, jax.random.key(config.seed),
                                  cfg=float(config.sample_cfg), steps=20, pad_id=tokenizer.pad_id)
  vae = run_lib.load_vae(config.vae.checkpoint)
  images = vae_tokens.decode_tokens(vae, tokens, side, side)
  return images_lib.image_grid(to_uint8(images))
