"""The training loop: restore or init, the steps, the end-of-step policy, held-out eval, sample grids.

``train(config, workdir)`` reads top to bottom:
  1. parallel: jax.distributed (multi-host), the (data, fsdp, tensor) mesh, the logical rules; and
     the run's guards (``start`` -> ``Session``, shared with DPO and the VAE trainer): SIGINT /
     SIGTERM handled from the first line (a stop before the first step ends the run without saving,
     exit status 0), the workdir lock (training/workdir_lock.py: a second writer is refused), and
     the refusal of a config whose architecture differs from the checkpoints already there;
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
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from nextstep_jax import config as config_lib
from nextstep_jax import parallel
from nextstep_jax import run as run_lib
from nextstep_jax import sampling
from nextstep_jax import storage
from nextstep_jax import vae_tokens
from nextstep_jax.batch import to_uint8
from nextstep_jax.data import images as images_lib
from nextstep_jax.data import mixture
from nextstep_jax.training import checkpoint as ckpt_lib
from nextstep_jax.training import flops as flops_lib
from nextstep_jax.training import lora as lora_lib
from nextstep_jax.training import metrics as metrics_lib
from nextstep_jax.training import workdir_lock
from nextstep_jax.training.metrics import log
from nextstep_jax.training.trainer import State, Trainer, count_params


# The fields that shape the parameters (and so the checkpoints): a run that holds checkpoint steps
# is not resumed with other values (workdir_lock.refuse_architecture_change).
ARCHITECTURE_FIELDS = (
  "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.head_dim",
  "model.intermediate_size", "model.vocab_size", "head.dim", "head.num_layers",
  "image.latent_channels", "image.patch_size", "image.token_dim",
  "lora.rank", "lora.targets", "lora.head_targets")
# Names in a mirrored remote work directory that stay on this host: the lock, orbax's unfinished
# saves, steps moved aside as unreadable.
MIRROR_PRIVATE = (workdir_lock.LOCK_FILE + "*", "*" + ckpt_lib.ORBAX_TMP_MARK + "*",
                  "*" + ckpt_lib.QUARANTINE_SUFFIX + "*")


class Stopped(Exception):
  """A stop (SIGINT / SIGTERM) requested before the first step of the run: nothing to save. Raised by
  ``Session.check_stop``; the session ends the run with one line and no error (exit status 0)."""


class Session:
  """The guards of one run from its first line to its last: the stop signal (SIGTERM / SIGINT ask
  the run to end cleanly, at any moment, start-up and compilation included) and the work
  directory's lock (process 0). ``start`` opens it for train and DPO, the VAE trainer opens its own.

  Used as ``with session: ...``: on leaving, the lock is released and the signal handlers restored
  (normal end, exception, SIGTERM); a ``Stopped`` raised inside is logged and swallowed, so the run
  ends with exit status 0."""

  def __init__(self) -> None:
    self.stop = StopSignal()
    self.lock: workdir_lock.WorkdirLock | None = None
    self.workdir = ""
    self.mesh = None
    # A remote work directory (gs://, s3://...): its local mirror is self.workdir (storage.py).
    self.mirror: storage.RemoteWorkdir | None = None
    self._pulled = False

  def local_workdir(self, workdir: str, private=MIRROR_PRIVATE) -> str:
    """The directory the run writes: `workdir` itself, or for a URL (gs://, s3://...) its local mirror,
    opened here (``storage.RemoteWorkdir``; `private`: the names that stay on this host). A job of
    several processes is refused a URL (``storage.check_workdir``)."""
    if not storage.is_remote(workdir):
      return workdir
    storage.check_workdir(workdir, jax.process_count())
    self.mirror = storage.RemoteWorkdir(workdir, steps_dir=run_lib.CHECKPOINTS, private=private)
    log(f"work directory {workdir}: mirrored in {self.mirror.local}")
    return self.mirror.local

  def guard(self, workdir: str, config, fields=ARCHITECTURE_FIELDS,
            saved_files=(os.path.join(run_lib.CHECKPOINTS, run_lib.CONFIG_FILE),)) -> None:
    """Before anything is written into `workdir`: takes its lock (process 0; a second writer is
    refused, naming the holder), then refuses a config whose architecture (`fields`) differs from
    the saved one of the checkpoints there."""
    self.workdir = workdir
    self.lock = workdir_lock.acquire(workdir, jax.process_index())
    if self.lock is not None:
      self.stop.on_force.append(self.lock.abandon)
    if self.mirror is not None:  # the remote's newest complete step and run files, before the check
      self.mirror.pull()
      self._pulled = True
    workdir_lock.refuse_architecture_change(workdir, ckpt_lib.config_to_json(config), fields,
                                            saved_files=saved_files, ckpt_dir=run_lib.CHECKPOINTS)

  def check_stop(self) -> None:
    """Raises Stopped when a stop was requested (call it between the phases of start-up)."""
    self.stop.check()

  def close(self) -> None:
    try:
      if self.mirror is not None and self._pulled:  # the run files written last (metrics, events)
        self.mirror.sync_files()
    finally:
      try:
        if self.lock is not None:
          self.lock.release()
      finally:
        self.stop.restore()

  def __enter__(self) -> "Session":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    self.close()
    if exc_type is not None and issubclass(exc_type, Stopped):
      log(str(exc))
      return True
    return False


def start(config, workdir: str | None) -> Session:
  """The run's guards, then distributed start-up, the config checked against the devices, the
  mesh, the work directory (locked, and refused when its checkpoints have another architecture).
  Returns the open Session (``.workdir``, ``.mesh``, ``.stop``); the caller closes it (``with``)."""
  session = Session()  # the stop-signal handler first: a Ctrl-C from here on ends the run cleanly
  try:
    parallel.maybe_initialize_distributed()
    session.stop.install()  # again, over any handler the distributed start-up installed
    workdir = workdir or config.workdir
    storage.check_workdir(workdir, jax.process_count())  # a remote one: one process only
    config_lib.validate(config, num_devices=jax.device_count(), num_granules=parallel.num_granules())
    mesh = parallel.make_hybrid_mesh(config.mesh)
    workdir = session.local_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    session.guard(workdir, config)
    session.mesh = mesh
    log(f"devices {jax.device_count()} ({jax.default_backend()}), processes {jax.process_count()}, "
        f"mesh {dict(mesh.shape)}")
  except BaseException:
    session.close()
    raise
  return session


def restore_or_init(trainer: Trainer, ckpt: ckpt_lib.Checkpointer, data_iter, *, init_from: str,
                    required: str = "", what: str = "params", stop: "StopSignal | None" = None) -> State:
  """The state to start from: the newest checkpoint step that passes its integrity check (unreadable
  newer steps are named in a warning and moved aside, never deleted; the data iterator resumes too),
  else fresh optimizer and step around ``init_from``'s params (with LoRA they become the frozen
  base), else a fresh state. `required`: when set, starting from nothing is refused with this text.
  The config is saved beside the checkpoints (``Checkpointer.write_config``) once one of these
  succeeded, never before, and not when `stop` was requested meanwhile (then Stopped is raised)."""
  restored = ckpt.restore_latest_good(parallel.with_shardings(trainer.abstract_state,
                                                              trainer.state_shardings))
  if restored is not None:
    step, state, data_state = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    log(f"resumed from step {step}")
  elif init_from:
    if trainer.lora is None:
      target = parallel.with_shardings(trainer.abstract_params, trainer.param_shardings)
    else:
      target = parallel.with_shardings(trainer.base_abstract, trainer.base_shardings)
    step, params = ckpt_lib.restore_params_step(init_from, target)
    log(f"{what} initialised from {init_from} (step {step})" if what != "params" else
        f"initialised params from {init_from} (step {step})")
    state = trainer.state_from_params(params)
  elif required:
    raise config_lib.ConfigError(required)
  else:
    state = trainer.init_state(trainer.config.seed)
  if stop is not None:
    stop.check()  # a stop during the restore or init (its compilation): nothing is written
  ckpt.write_config()
  return state


def train(config, workdir: str | None = None) -> dict[str, float]:
  """Runs (or resumes) training to ``config.steps``. Returns the last logged metrics ({} when a stop
  came before the first step)."""
  # 1. parallel, and the run's guards (stop signal, workdir lock, architecture check)
  with start(config, workdir) as run:
    workdir, mesh = run.workdir, run.mesh
    pidx, pcount = jax.process_index(), jax.process_count()

    # 2. data
    tokenizer = run_lib.load_tokenizer(config, workdir, build=True)
    data_iter = mixture.build_train_iterator(config, tokenizer, pidx, pcount, workdir=workdir)
    run.check_stop()

    # 3. model, state, checkpoints
    trainer = Trainer(config, mesh, vae=run_lib.vae_encoder(config))
    log(f"parameters: {count_params(trainer.abstract_params):,}")
    run.check_stop()
    ckpt = ckpt_lib.Checkpointer.from_config(config, os.path.join(workdir, run_lib.CHECKPOINTS),
                                             replica=run.mirror)
    with LoopControl(config, ckpt, run.stop) as control:
      state = restore_or_init(trainer, ckpt, data_iter, init_from=config.checkpoint.init_from,
                              stop=run.stop)
      step = int(state["step"])
      run.check_stop()  # before the first step

      # 4-6. the loop
      writer = control.open_writer(workdir, pidx, config.log_every)
      timer = metrics_lib.StepTimer()
      tokens_per_step = config.data.batch_size * config.data.seq_len
      flops_per_step = flops_lib.step_flops(config)
      device_kind = jax.devices()[0].device_kind
      eval_batches = None
      profile = profile_range(config.profile_steps)
      last: dict[str, float] = {}
      data_wait = 0.0
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
            eval_batches = mixture.build_eval_batches(config, tokenizer, int(config.eval_batches),
                                                    workdir=workdir, settings=data_iter.settings)
          evals = evaluate_heldout(trainer, state, eval_batches, mesh)
          writer.write_scalars(step, evals)
          if config.sample_prompts and trainer.vae is not None:
            grid = sample_grid(trainer, state, config, tokenizer)
            writer.write_images(step, "samples", grid)
        if control.save_or_stop(step, state, streak, data_iter.get_state):
          break
    return last
  return {}  # a stop before the first step (the session logged it)


class LoopControl:
  """The end of every step of a training loop (train.train, dpo.train_dpo): the check on runs of
  non-finite steps, the periodic, final and on-signal saves, and the stop on SIGTERM or preemption.
  `stop`: the run's StopSignal (``Session.stop``); without one, LoopControl installs its own and
  restores the old handlers on close. Used as a context manager (``with LoopControl(...) as control:``
  around the restore and the loop), it closes on the way out, however the loop ends."""

  def __init__(self, config, ckpt: ckpt_lib.Checkpointer, stop: "StopSignal | None" = None):
    self.ckpt = ckpt
    self.final_step = int(config.steps)
    self.max_bad = int(config.max_skipped_steps)
    self._own_stop = stop is None
    self.stop = StopSignal() if stop is None else stop
    self.writer: metrics_lib.MetricsWriter | None = None

  def __enter__(self) -> "LoopControl":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def open_writer(self, workdir: str, process_index: int, log_every: int) -> metrics_lib.MetricsWriter:
    """The loop's MetricsWriter (metrics to TensorBoard, metrics.jsonl and the console every
    `log_every` steps), closed with the checkpointer (``close``)."""
    self.writer = metrics_lib.MetricsWriter(workdir, process_index, console_every=log_every)
    return self.writer

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
    """Waits for pending saves and closes the checkpointer (and the loop's metrics writer, if open)."""
    try:
      if self._own_stop:
        self.stop.restore()
    finally:
      try:
        self.ckpt.wait()
        self.ckpt.close()
      finally:
        if self.writer is not None:
          self.writer.close()


# KeyboardInterrupts that Python could only report ("Exception ignored in: <function
# _xla_gc_callback ...>"): raised inside a garbage-collector callback or a finalizer, they are
# swallowed and the program goes on. Noted here, they become a stop request of the run (StopSignal),
# so a Ctrl-C that lands there still ends the run. (Once a StopSignal is installed, SIGINT raises
# no KeyboardInterrupt at all; this covers a Ctrl-C before that, from this module's import on.)
_SWALLOWED_INTERRUPTS: list[float] = []


def _note_swallowed_interrupt(unraisable, _previous=sys.unraisablehook) -> None:
  if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
    _SWALLOWED_INTERRUPTS.append(time.time())
  _previous(unraisable)


if getattr(sys.unraisablehook, "__name__", "") != _note_swallowed_interrupt.__name__:
  sys.unraisablehook = _note_swallowed_interrupt


class StopSignal:
  """SIGTERM (a preemption notice) or SIGINT asks the run to stop: the loop saves the current step
  and exits 0; before the first step the run ends without saving (``Session.check_stop``), also
  with exit status 0. The handler only sets a flag, so no KeyboardInterrupt is ever raised inside
  XLA, a compilation or a garbage-collector callback (where Python would print "Exception ignored"
  and carry on). A second SIGINT exits at once (status 130) without saving: the newest checkpoint
  is the one the run resumes from; the workdir lock is removed first."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  last_reason = ""  # the reason of the last stop requested in this process (for chained runs)

  def __init__(self, install: bool = True):
    self._requested = False
    self.reason = ""
    # Swallowed interrupts of this run's start-up count; older ones (a long-lived process) do not.
    _SWALLOWED_INTERRUPTS[:] = [t for t in _SWALLOWED_INTERRUPTS if t > time.time() - 120]
    self._old: dict = {}
    self.on_force: list[Callable[[], None]] = []
    if install:
      self.install()

  @property
  def requested(self) -> bool:
    """True once SIGTERM or SIGINT arrived (or a KeyboardInterrupt was swallowed, see above)."""
    if _SWALLOWED_INTERRUPTS:
      _SWALLOWED_INTERRUPTS.clear()
      self._request("SIGINT")
    return self._requested

  def _request(self, name: str) -> None:
    self._requested = True
    self.reason = self.reason or name
    StopSignal.last_reason = self.reason

  def check(self) -> None:
    """Raises Stopped when a stop was requested (before the first step: nothing to save)."""
    if self.requested:
      raise Stopped(f"stop requested ({self.reason}) before the first step: exiting, nothing saved")

  def install(self) -> None:
    """Installs the handler (again: over any handler installed since); keeps the original ones."""
    for sig in self.SIGNALS:
      try:
        current = signal.getsignal(sig)
        if current != self._handle:
          old = signal.signal(sig, self._handle)
          self._old.setdefault(sig, old)
      except ValueError:  # not the main thread: leave signals alone
        pass

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self._requested and signum == signal.SIGINT:
      _say(f"\n{name} again: exiting now without saving (the newest checkpoint is kept)\n")
      for fn in self.on_force:
        try:
          fn()
        except Exception:  # pylint: disable=broad-except
          pass
      os._exit(130)  # pylint: disable=protected-access
    if not self._requested:
      _say(f"\n{name} received: stopping cleanly (a step in flight is saved; Ctrl-C again exits at "
           "once without saving)\n")
    self._request(name)

  def restore(self) -> None:
    for sig, old in self._old.items():
      try:
        signal.signal(sig, old if old is not None else signal.SIG_DFL)
      except ValueError:
        pass
    self._old = {}


def _say(text: str) -> None:
  """A line on stderr from a signal handler (os.write: no buffered-IO reentrancy)."""
  try:
    os.write(2, text.encode())
  except OSError:
    pass


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
