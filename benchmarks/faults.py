"""Fault injection for the demo training: kill it, preempt it, corrupt its checkpoints, poison its
batches, and check that it recovers exactly.

  python benchmarks/faults.py [--trials=3] [--steps=24] [--kills=6] [--seed=0] [--workdir=DIR]
  python benchmarks/faults.py child [--nan-at=SPEC] [--inf-at=SPEC] -- <train flags>

Each trial trains the shrunk demo (2 layers, 4 rows of 128 tokens, pixels encoded in the step by a
demo VAE) twice: once uninterrupted, once under a random fault plan of
  * SIGKILL at `--kills` random steps, one of them while an asynchronous checkpoint save is being
    written (the harness waits for orbax's temporary directory and kills the trainer inside that
    window, then checks the directory was left unfinished);
  * one SIGTERM (a preemption notice): the trainer must save the current step and exit 0 within
    seconds, and the restart must continue from exactly that step;
  * one corrupted newest checkpoint (a truncated array file) before a restart: the restart must
    warn, naming the step, and resume from the previous one.
After each fault the trainer is restarted, until the run finishes. Outcome: the final train state
(params, optimizer state, counters, data-iterator state) and every logged metric but timings,
including the ones of steps replayed after a restart, compared bitwise with the uninterrupted run.

Prints one line per fault and a summary per trial; exits 1 when any trial differs. The tests
(tests/test_faults.py) run a short plan through the same functions.

`child` runs the train entry point (``nextstep_jax.train``) with NaN or Inf written into the
pixels of chosen batches (SPEC: "3,6-8,10-": 1-based batch numbers of this process), which makes
the loss and gradients of those steps non-finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# Metrics that measure time, not training: never compared.
TIMING_KEYS = frozenset({"time", "step_time", "tokens_per_s", "data_wait_s", "compute_s", "tflops_per_device", "mfu"})
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"


# ------------------------------------------------------------------------------------------------
# Assets and commands
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Assets:
  """What every demo run shares: a VAE workdir, a tokenizer directory, a compilation cache."""
  vae: str
  tokenizer: str
  cache: str


def prepare_assets(root: str | os.PathLike, vae: str | None = None) -> Assets:
  """Writes the shared assets under `root` (reused when present).

  The VAE is the demo preset with its random initial weights, exported as a train_vae workdir
  (``vae_config.json`` + ``export/``): faults are about the transformer's training, which only
  needs the VAE's shapes, so training it first would cost minutes for nothing. Pass `vae` to use
  a trained one (``python -m nextstep_jax.train_vae --config=configs/vae_demo.py``).
  """
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  if vae is None:
    vae = str(root / "vae")
    if not (Path(vae) / "export" / "config.json").exists():
      from nextstep_jax.training import vae_trainer  # pylint: disable=import-outside-toplevel
      from nextstep_jax.interop.vae import export_vae  # pylint: disable=import-outside-toplevel
      from nextstep_jax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel
      model = vae_lib.build_vae("demo", seed=0)
      export_vae(model, os.path.join(vae, vae_trainer.EXPORT_DIR))
      Path(vae, vae_trainer.VAE_CONFIG_FILE).write_text(model.config.to_json())
  tokenizer = root / "tokenizer"
  if not (tokenizer / "tokenizer.model").exists():
    from nextstep_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
    tok_lib.build_demo_tokenizer(str(root), vocab_size=512)
  cache = root / "jax_cache"
  cache.mkdir(exist_ok=True)
  return Assets(vae=str(vae), tokenizer=str(tokenizer), cache=str(cache))


def child_env(assets: Assets) -> dict[str, str]:
  """Environment of a trainer process: one CPU device, fast-compiling XLA (as the tests), a
  persistent compilation cache shared by all runs (a restart then loads its executables instead
  of compiling them again; identical executables, so results do not change)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_force_host_platform_device_count",
                                "--xla_backend_optimization_level"))]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_backend_optimization_level=0"])
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=assets.cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1",
             NEXTSTEP_DISTRIBUTED="0")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def train_flags(workdir: str | os.PathLike, assets: Assets, steps: int, every: int = 2,
                keep: int = 3, extra: Sequence[str] = ()) -> list[str]:
  """Flags of the shrunk demo run (the same code path as configs/demo.py, sized for seconds)."""
  return ["--config=" + str(REPO / "configs" / "demo.py"), f"--workdir={workdir}",
          f"--config.steps={steps}", f"--config.vae.checkpoint={assets.vae}",
          f"--config.tokenizer.path={assets.tokenizer}", "--config.model.num_layers=2",
          "--config.data.batch_size=4", "--config.log_every=1",
          f"--config.checkpoint.every={every}", f"--config.checkpoint.keep={keep}",
          "--config.eval_every=1000", "--config.optim.warmup_steps=1",
          "--config.sample_prompts=()", *extra]


def train_command(flags: Sequence[str], nan_at: str = "", inf_at: str = "") -> list[str]:
  """The trainer's command line: ``python -m nextstep_jax.train``, or this file's ``child``
  mode when batches are poisoned."""
  if nan_at or inf_at:
    return [sys.executable, "-u", str(Path(__file__).resolve()), "child", f"--nan-at={nan_at}",
            f"--inf-at={inf_at}", "--", *flags]
  return [sys.executable, "-u", "-m", "nextstep_jax.train", *flags]


# ------------------------------------------------------------------------------------------------
# A trainer process that can be watched and hurt
# ------------------------------------------------------------------------------------------------
_STEP_LINE = re.compile(r"^step (\d+) \| loss ")
_RESUMED = re.compile(r"resumed from step (\d+)")


class TrainerProcess:
  """A trainer subprocess; a thread reads its output (stdout and stderr together) and notes the
  newest logged step and the step it resumed from."""

  def __init__(self, command: Sequence[str], env: dict[str, str], log_path: str | os.PathLike):
    self.log_path = Path(log_path)
    self.lines: list[str] = []
    self.last_step = 0
    self.resumed_from: int | None = None
    self._cond = threading.Condition()
    self.proc = subprocess.Popen(list(command), cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    with open(self.log_path, "a", encoding="utf-8") as log:
      for line in self.proc.stdout:
        log.write(line)
        log.flush()
        with self._cond:
          self.lines.append(line)
          if m := _STEP_LINE.match(line):
            self.last_step = max(self.last_step, int(m.group(1)))
          elif m := _RESUMED.search(line):
            self.resumed_from = int(m.group(1))
          self._cond.notify_all()
    with self._cond:
      self._cond.notify_all()

  @property
  def output(self) -> str:
    with self._cond:
      return "".join(self.lines)

  def wait_step(self, step: int, timeout: float) -> bool:
    """Blocks until the trainer logs a step >= `step` (True) or exits / times out (False)."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while self.last_step < step:
        if self.proc.poll() is not None and not self._reader.is_alive():
          return False
        left = deadline - time.monotonic()
        if left <= 0:
          return False
        self._cond.wait(min(left, 0.5))
    return True

  def signal(self, sig: int) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)

  def wait(self, timeout: float) -> int:
    """Exit status (negative: killed by that signal); kills the trainer after `timeout`."""
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      rc = self.proc.wait()
      self.lines.append(f"[harness] killed after a {timeout:.0f} s timeout\n")
    self._reader.join(timeout=10)
    return rc


def finished_steps(ckpt_dir: str | os.PathLike) -> list[int]:
  """Published checkpoint steps (numeric directories; unfinished and moved-aside ones are not)."""
  d = Path(ckpt_dir)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def unfinished_saves(ckpt_dir: str | os.PathLike) -> list[str]:
  d = Path(ckpt_dir)
  return sorted(p.name for p in d.iterdir() if ORBAX_TMP_MARK in p.name) if d.is_dir() else []


def corrupt_step(step_dir: str | os.PathLike) -> str:
  """Truncates the largest array data file of a checkpoint step to half; returns its path."""
  files = [p for p in Path(step_dir, "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  if not files:
    raise FileNotFoundError(f"no array data files under {step_dir}/state")
  path = max(files, key=lambda p: p.stat().st_size)
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)
  return str(path)


# ------------------------------------------------------------------------------------------------
# Fault plans
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fault:
  """`kind`: "kill" (SIGKILL once step `step` is logged), "kill_in_save" (SIGKILL inside the
  first asynchronous save that starts once `step` is logged), "term" (SIGTERM once `step` is
  logged) or "corrupt" (truncate the newest checkpoint before the next restart)."""
  kind: str
  step: int = 0


@dataclasses.dataclass
class Event:
  """What one fault did: the process's exit status, where the restart resumed, checks passed."""
  fault: Fault
  at_step: int = 0            # newest logged step when the fault hit
  rc: int | None = None
  exit_s: float = 0.0         # SIGTERM: seconds from the signal to the exit
  detail: str = ""
  problems: list[str] = dataclasses.field(default_factory=list)
  restarted: bool = False     # a trainer was started after this fault (resume fields valid)
  expect_resume: int | None = None
  resumed_from: int | None = None


def random_plan(rng: random.Random, steps: int, kills: int) -> list[Fault]:
  """`kills` SIGKILLs (one of them inside a save) and one SIGTERM at distinct increasing random
  steps in [2, steps - 1], and one corruption of the newest checkpoint after a random one of
  them (applied once at least two steps are published)."""
  if kills < 1 or steps - 2 < kills + 1:
    raise ValueError(f"--steps={steps} leaves too few steps for {kills} kills and a SIGTERM")
  points = sorted(rng.sample(range(2, steps), kills + 1))
  kinds = ["kill_in_save", "term"] + ["kill"] * (kills - 1)
  rng.shuffle(kinds)
  plan = [Fault(k, s) for k, s in zip(kinds, points)]
  plan.insert(rng.randrange(1, len(plan) + 1), Fault("corrupt"))
  return plan


def run_plan(workdir: str | os.PathLike, assets: Assets, steps: int, plan: Sequence[Fault],
             every: int = 2, keep: int = 3, timeout: float = 600.0, term_deadline_s: float = 60.0,
             log: Callable[[str], None] = print) -> tuple[list[Event], int]:
  """Runs the demo to `steps` in `workdir`, applying `plan` in order and restarting after each
  fault; the last trainer runs to the end. Returns (events, exit status of the last trainer).

  Checks made on the way (recorded in each Event's `problems`): a kill inside a save leaves that
  save unfinished; SIGTERM exits 0 within `term_deadline_s` with the current step saved; every
  restart resumes from the newest published step (the SIGTERM step; the previous step after a
  corruption); a corrupted step is named in a warning and moved aside to ``<step>.corrupt``.
  """
  workdir = Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  env = child_env(assets)
  command = train_command(train_flags(workdir, assets, steps, every, keep))
  log_path = workdir.parent / f"{workdir.name}.log"
  events: list[Event] = []
  plan = list(plan)
  expect: int | None = None       # where the next start must resume (None: a fresh start)
  corrupted: int | None = None    # the step corrupted before the next start
  want_corrupt = False            # a corruption is due (deferred until two steps are published)
  missed_saves = 0
  while True:
    fault = None
    while plan and fault is None:
      f = plan.pop(0)
      fault = f if f.kind != "corrupt" else None  # corruptions are applied after a fault
    trainer = TrainerProcess(command, env, log_path)
    cause = events[-1] if events else None

    def check_restart(trainer=trainer, cause=cause, expect=expect, corrupted=corrupted):
      if cause is None:
        return
      cause.restarted = True
      cause.expect_resume, cause.resumed_from = expect, trainer.resumed_from
      if trainer.resumed_from != expect:
        cause.problems.append(f"the restart resumed from step {trainer.resumed_from}, "
                              f"expected {expect}")
      if corrupted is not None:
        if not re.search(rf"step {corrupted} .*unusable", trainer.output):
          cause.problems.append(f"the restart printed no warning naming the corrupt step {corrupted}")
        if not (ckpt_dir / f"{corrupted}.corrupt").is_dir():
          cause.problems.append(f"the corrupt step {corrupted} was not moved aside")

    if fault is None:
      rc = trainer.wait(timeout)
      check_restart()
      if rc != 0:
        log(f"  the final run exited {rc}:\n{_tail(trainer.output)}")
      return events, rc
    event = Event(fault)
    if not trainer.wait_step(fault.step, timeout):
      rc = trainer.wait(timeout)
      check_restart()
      event.rc = rc
      event.problems.append(f"the trainer ended (exit {rc}) before step {fault.step}")
      events.append(event)
      log(f"  {_describe(event)}\n{_tail(trainer.output)}")
      return events, rc
    check_restart()
    if fault.kind in ("kill", "kill_in_save"):
      seen = _wait_for_unfinished_save(ckpt_dir, trainer, timeout) if fault.kind == "kill_in_save" else None
      trainer.proc.kill()
      event.rc = trainer.wait(timeout)
      event.at_step = trainer.last_step
      if fault.kind == "kill_in_save":
        if seen and seen in unfinished_saves(ckpt_dir):
          event.detail = f"inside the save {seen}"
        elif missed_saves < 3:  # the save finished between seeing it and the kill: try again
          missed_saves += 1
          event.detail = f"missed the save window ({seen or 'no save started'}); trying again"
          plan.insert(0, Fault("kill_in_save", fault.step))
        else:
          event.problems.append(f"the kill missed the save window {missed_saves + 1} times")
      if event.rc != -signal.SIGKILL:
        event.problems.append(f"exit status {event.rc} after SIGKILL")
    elif fault.kind == "term":
      t0 = time.monotonic()
      trainer.signal(signal.SIGTERM)
      event.rc = trainer.wait(timeout)
      event.exit_s = time.monotonic() - t0
      event.at_step = trainer.last_step
      saved = finished_steps(ckpt_dir)
      event.detail = f"exit {event.rc} after {event.exit_s:.1f} s; published steps {saved}"
      if event.rc != 0:
        event.problems.append(f"SIGTERM: exit status {event.rc}, not 0")
      if event.exit_s > term_deadline_s:
        event.problems.append(f"SIGTERM: {event.exit_s:.1f} s to exit (> {term_deadline_s:.0f} s)")
      if trainer.last_step not in saved:
        event.problems.append(f"SIGTERM at step {trainer.last_step}: that step was not saved")
    else:
      raise ValueError(f"unknown fault kind {fault.kind!r}")
    events.append(event)
    log(f"  {_describe(event)}")
    published = finished_steps(ckpt_dir)
    expect, corrupted = (published[-1] if published else None), None
    if plan and plan[0].kind == "corrupt":
      plan.pop(0)
      want_corrupt = True
    if want_corrupt and len(published) >= 2:
      path = corrupt_step(ckpt_dir / str(published[-1]))
      expect, corrupted, want_corrupt = published[-2], published[-1], False
      events.append(Event(Fault("corrupt", corrupted), at_step=corrupted,
                          detail=f"truncated {Path(path).relative_to(workdir)}"))
      log(f"  {_describe(events[-1])}")
    elif want_corrupt:
      log(f"  corrupt: deferred (published steps: {published})")


def _wait_for_unfinished_save(ckpt_dir: Path, trainer: TrainerProcess, timeout: float) -> str | None:
  """Polls (every millisecond) until orbax's temporary directory of a new save appears."""
  deadline = time.monotonic() + timeout
  known = set(unfinished_saves(ckpt_dir))  # leftovers of earlier kills do not count
  while time.monotonic() < deadline and trainer.proc.poll() is None:
    for name in unfinished_saves(ckpt_dir):
      if name not in known:
        return name
    time.sleep(0.001)
  return None


def _describe(e: Event) -> str:
  f = e.fault
  where = f"@{f.step}" if f.kind != "corrupt" else f" step {f.step}"
  bits = [f"{f.kind}{where}"]
  if f.kind != "corrupt":
    bits.append(f"(logged step {e.at_step}, exit {e.rc})")
  if e.detail:
    bits.append(e.detail)
  if e.restarted:
    bits.append(f"-> restart resumed from step {e.resumed_from}" if e.resumed_from is not None
                else "-> restart started afresh")
  if e.problems:
    bits.append("PROBLEMS: " + "; ".join(e.problems))
  return " ".join(bits)


def _tail(text: str, lines: int = 30) -> str:
  return "\n".join("    " + line for line in text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------
# Comparing two runs
# ------------------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b


def metric_records(workdir: str | os.PathLike) -> dict[int, list[dict]]:
  """step -> the records logged for it (timings dropped), in file order."""
  from nextstep_jax.training import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  out: dict[int, list[dict]] = {}
  for rec in metrics_lib.read_jsonl(Path(workdir) / "metrics.jsonl"):
    out.setdefault(int(rec["step"]), []).append(
      {k: v for k, v in rec.items() if k not in TIMING_KEYS and k != "step"})
  return out


def compare_runs(reference: str | os.PathLike, candidate: str | os.PathLike, steps: int) -> list[str]:
  """Differences between an uninterrupted run and a faulted one (empty: bitwise equal).

  Metrics: every step 1..`steps` must be logged, and every record of a step (replayed steps are
  logged more than once) must equal the reference's, keys and values, bit for bit. Checkpoint:
  the final step's whole train state and data-iterator state must be bitwise equal.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training.checkpoint import read_step  # pylint: disable=import-outside-toplevel
  problems: list[str] = []
  ref, got = metric_records(reference), metric_records(candidate)
  for step in range(1, steps + 1):
    want = ref.get(step, [])
    have = got.get(step, [])
    if not want:
      problems.append(f"the reference logged nothing at step {step}")
      continue
    if not have:
      problems.append(f"step {step} was never logged")
      continue
    train_want = [r for r in want if "loss" in r]
    for rec in have:
      match = [w for w in want if w.keys() == rec.keys()]
      if not match:
        problems.append(f"step {step}: a record with keys {sorted(rec)} the reference lacks")
      elif not any(all(_same(rec[k], w[k]) for k in rec) for w in match):
        w = match[0]
        diff = {k: (rec[k], w[k]) for k in rec if not _same(rec[k], w[k])}
        problems.append(f"step {step}: {diff} (faulted, reference)")
    if train_want and not any("loss" in r for r in have):
      problems.append(f"step {step}: no training record")
  for step in sorted(set(got) - set(ref)):
    problems.append(f"step {step} logged by the faulted run only")
  try:
    s_ref, state_ref, data_ref = read_step(Path(reference) / "checkpoints", steps)
    s_got, state_got, data_got = read_step(Path(candidate) / "checkpoints", steps)
  except (FileNotFoundError, RuntimeError) as e:
    problems.append(f"final checkpoint: {e}")
    return problems
  flat_ref = jax.tree_util.tree_flatten_with_path(state_ref)[0]
  flat_got = jax.tree_util.tree_flatten_with_path(state_got)[0]
  if [p for p, _ in flat_ref] != [p for p, _ in flat_got]:
    problems.append("final checkpoint: the state trees differ")
    return problems
  differing = []
  for (path, a), (_, b) in zip(flat_ref, flat_got):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      differing.append(jax.tree_util.keystr(path))
  if differing:
    problems.append(f"final checkpoint (step {s_ref}/{s_got}): {len(differing)} of {len(flat_ref)} "
                    f"arrays differ, e.g. {differing[:3]}")
  if data_ref != data_got:
    problems.append("final checkpoint: the data-iterator states differ")
  return problems


def run_reference(workdir: str | os.PathLike, assets: Assets, steps: int, every: int = 2,
                  keep: int = 3, timeout: float = 600.0) -> TrainerProcess:
  """The uninterrupted run (same flags). Returns the finished trainer (check .proc.returncode)."""
  workdir = Path(workdir)
  trainer = TrainerProcess(train_command(train_flags(workdir, assets, steps, every, keep)),
                    child_env(assets), workdir.parent / f"{workdir.name}.log")
  trainer.wait(timeout)
  return trainer


# ------------------------------------------------------------------------------------------------
# `child`: the train entry point with poisoned batches
# ------------------------------------------------------------------------------------------------
def parse_batches(spec: str) -> Callable[[int], bool]:
  """'3,6-8,10-' -> a predicate on 1-based batch numbers."""
  ranges: list[tuple[int, float]] = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    m = re.fullmatch(r"(\d+)(?:-(\d*))?", part)
    if not m:
      raise ValueError(f"batch spec {spec!r}: {part!r} is not N, N-M or N-")
    lo = int(m.group(1))
    hi = float("inf") if m.group(2) == "" else int(m.group(2) or lo)
    ranges.append((lo, hi))
  return lambda n: any(lo <= n <= hi for lo, hi in ranges)


class PoisonedIterator:
  """Wraps the train iterator; writes NaN or Inf into all pixels of the chosen batches."""

  def __init__(self, inner, nan_at: Callable[[int], bool], inf_at: Callable[[int], bool]):
    self._inner = inner
    self._nan_at, self._inf_at = nan_at, inf_at
    self.batches = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    self.batches += 1
    value = math.nan if self._nan_at(self.batches) else math.inf if self._inf_at(self.batches) else None
    if value is not None:
      key = "images" if "images" in batch else "image_tokens"
      batch = dict(batch)
      batch[key] = batch[key].copy()
      batch[key][...] = value
      print(f"[faults] batch {self.batches}: {key} set to {value}", flush=True)
    return batch

  def __getattr__(self, name):
    return getattr(self._inner, name)


def child_main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(prog="faults.py child")
  parser.add_argument("--nan-at", default="")
  parser.add_argument("--inf-at", default="")
  parser.add_argument("--heartbeat", type=int, default=0,
                      help="jax.distributed heartbeat timeout (s) unless the project sets one")
  args, rest = parser.parse_known_args(argv)
  if rest and rest[0] == "--":
    rest = rest[1:]
  nan_at, inf_at = parse_batches(args.nan_at), parse_batches(args.inf_at)
  _default_heartbeat(args.heartbeat)
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from nextstep_jax import train  # pylint: disable=import-outside-toplevel
  from nextstep_jax.data import mixture  # pylint: disable=import-outside-toplevel
  build = mixture.build_train_iterator
  mixture.build_train_iterator = lambda *a, **k: PoisonedIterator(build(*a, **k), nan_at, inf_at)
  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  flags.DEFINE_string("workdir", "", "output directory")
  app.run(train.main, argv=[sys.argv[0], *rest])


# ------------------------------------------------------------------------------------------------
# Multi-process: one of two processes dies
# ------------------------------------------------------------------------------------------------
# What a survivor prints when its peer is gone: gloo's error in the collective it was running,
# or the coordination service's verdict (heartbeat timeout, or the coordinator's socket closed).
PEER_DEATH_ERRORS = re.compile(
  r"Gloo .* failed|Connection closed by peer|Connection reset by peer|another task died|"
  r"heartbeat timeout|stopped sending heartbeats|Failed to send RPC to coordination service|"
  r"detected fatal errors", re.IGNORECASE)


def _default_heartbeat(seconds: int) -> None:
  """Makes `seconds` the default heartbeat timeout of jax.distributed.initialize (a value the
  project passes itself still wins)."""
  if seconds <= 0:
    return
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  init = jax.distributed.initialize

  @functools.wraps(init)
  def initialize(*args, **kwargs):
    kwargs.setdefault("heartbeat_timeout_seconds", seconds)
    return init(*args, **kwargs)

  jax.distributed.initialize = initialize


def peer_main(argv: Sequence[str]) -> None:
  """One of N processes that all-reduce a global array every step and save it asynchronously
  every 3 steps: what a data-parallel train step and its checkpoints do, in a second."""
  parser = argparse.ArgumentParser(prog="faults.py peer")
  parser.add_argument("--ckpt-dir", required=True)
  parser.add_argument("--steps", type=int, default=100000)
  parser.add_argument("--heartbeat", type=int, default=0)
  args = parser.parse_args(argv)
  _default_heartbeat(args.heartbeat)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  from nextstep_jax import parallel  # pylint: disable=import-outside-toplevel
  from nextstep_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  if not parallel.maybe_initialize_distributed():
    raise SystemExit("peer: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  total = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
  pid = jax.process_index()
  with Checkpointer(args.ckpt_dir, every=3, keep=2) as ckpt:
    for step in range(1, args.steps + 1):
      local = np.full((jax.local_device_count(), 256), step * (pid + 1), np.float32)
      x = jax.make_array_from_process_local_data(rows, local)
      y = total(x)
      ckpt.save(step, {"x": x, "total": y})
      print(f"peer {pid} step {step} total {float(y[0]):.0f}", flush=True)
      time.sleep(0.05)


def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@dataclasses.dataclass
class DeathOutcome:
  """How the survivor of a two-process run ended after its peer was killed."""
  victim: int
  survivor_rc: int | None
  exit_s: float               # from the kill to the survivor's exit
  clear_error: str            # the first line matching PEER_DEATH_ERRORS ('' when none)
  output: str


def peer_death_trial(root: str | os.PathLike, victim: int, command: Sequence[str] | None = None,
                     after_line: str = r"step 5\b", heartbeat: int = 5, timeout: float = 300.0,
                     env_extra: dict[str, str] | None = None,
                     watch: Sequence[int] = (0, 1)) -> DeathOutcome:
  """Starts two processes (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, one CPU
  device each, gloo collectives), SIGKILLs process `victim` once the processes in `watch` printed
  `after_line`, and waits (at most `timeout`) for the other to exit. `command` defaults to the
  ``peer`` worker."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  if command is None:
    command = [sys.executable, "-u", str(Path(__file__).resolve()), "peer",
               f"--ckpt-dir={root / 'checkpoints'}", f"--heartbeat={heartbeat}"]
  port = free_port()
  base = dict(os.environ)
  base.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1",
              JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  base["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
  base.pop("NEXTSTEP_DISTRIBUTED", None)
  base["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [base.get("PYTHONPATH")] if p])
  base.update(env_extra or {})
  procs = [TrainerProcess(command, dict(base, JAX_PROCESS_ID=str(i)), root / f"process_{i}.log")
           for i in range(2)]
  pattern = re.compile(after_line)
  deadline = time.monotonic() + timeout
  try:
    while not all(any(pattern.search(l) for l in list(procs[i].lines)) for i in watch):
      if any(p.proc.poll() is not None for p in procs) or time.monotonic() > deadline:
        out = "\n".join(f"--- process {i}\n{_tail(p.output)}" for i, p in enumerate(procs))
        raise RuntimeError(f"the two processes did not both reach /{after_line}/:\n{out}")
      time.sleep(0.05)
    procs[victim].proc.kill()
    t0 = time.monotonic()
    survivor = procs[1 - victim]
    rc = survivor.wait(max(deadline - time.monotonic(), 1.0))
    exit_s = time.monotonic() - t0
  finally:
    for p in procs:
      if p.proc.poll() is None:
        p.proc.kill()
        p.wait(10)
  out = survivor.output
  match = next((l.strip() for l in out.splitlines() if PEER_DEATH_ERRORS.search(l)), "")
  return DeathOutcome(victim, rc, exit_s, match[:300], out)


# ------------------------------------------------------------------------------------------------
# The long benchmark
# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trials", type=int, default=3)
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--kills", type=int, default=6, help="SIGKILLs per trial (>= 5)")
  parser.add_argument("--every", type=int, default=2, help="checkpoint.every")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vae", default=None, help="a trained VAE workdir (default: random demo VAE)")
  parser.add_argument("--workdir", default=None, help="keep everything here (default: a temp dir)")
  parser.add_argument("--heartbeat", type=int, default=10,
                      help="jax.distributed heartbeat timeout (s) for the two-process trials")
  parser.add_argument("--skip-peers", action="store_true", help="no two-process trials")
  parser.add_argument("--default-heartbeat", action="store_true",
                      help="also kill a two-process training run under jax's default heartbeat")
  args = parser.parse_args(argv)
  root = Path(args.workdir or tempfile.mkdtemp(prefix="nextstep_faults_"))
  t0 = time.monotonic()
  assets = prepare_assets(root / "assets", args.vae)
  print(f"assets ready in {time.monotonic() - t0:.1f} s under {root}")
  t0 = time.monotonic()
  ref = run_reference(root / "reference", assets, args.steps, args.every)
  if ref.proc.returncode != 0:
    print(f"reference run failed (exit {ref.proc.returncode}):\n{_tail(ref.output)}")
    return 1
  print(f"reference: {args.steps} steps uninterrupted in {time.monotonic() - t0:.1f} s")
  rng = random.Random(args.seed)
  print(f"fault plans drawn with --seed={args.seed} (the same --seed replays them)")
  totals = {"kill": 0, "kill_in_save": 0, "term": 0, "corrupt": 0}
  failed = 0
  term_times = []
  for trial in range(args.trials):
    plan = random_plan(rng, args.steps, args.kills)
    print(f"trial {trial}: plan " + ", ".join(
      f.kind if f.kind == "corrupt" else f"{f.kind}@{f.step}" for f in plan))
    t0 = time.monotonic()
    work = root / f"trial{trial}"
    shutil.rmtree(work, ignore_errors=True)
    events, rc = run_plan(work, assets, args.steps, plan, every=args.every, log=lambda _: None)
    problems = [f"{_describe(e)}" for e in events if e.problems]
    if rc != 0:
      problems.append(f"the final run exited {rc}")
    else:
      problems += compare_runs(root / "reference", work, args.steps)
    for e in events:
      totals[e.fault.kind] += 1
      if e.fault.kind == "term":
        term_times.append(e.exit_s)
    restarts = len([e for e in events if e.fault.kind != "corrupt"])
    outcome = "BITWISE EQUAL" if not problems else "DIFFERENT"
    print(f"trial {trial}: {restarts} restarts in {time.monotonic() - t0:.1f} s: {outcome}")
    for e in events:
      print(f"    {_describe(e)}")
    for p in problems:
      print(f"    {p}")
    failed += bool(problems)
  print(f"summary: {args.trials - failed}/{args.trials} trials bitwise equal to the uninterrupted "
        f"run; faults injected: {totals}; SIGTERM exits after "
        f"{', '.join(f'{t:.1f}' for t in term_times)} s")
  if not args.skip_peers:
    failed += peer_trials(root, assets, args.heartbeat, args.default_heartbeat)
  return 1 if failed else 0


def peer_trials(root: Path, assets: Assets, heartbeat: int, default_heartbeat: bool) -> int:
  """Two processes, one SIGKILLed: the `peer` worker (each victim), then the real trainer.
  Prints how the survivor ended; returns the number of trials where it hung or said nothing clear."""
  os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" not in f]
    + ["--xla_backend_optimization_level=0"])
  cache = dict(JAX_COMPILATION_CACHE_DIR=assets.cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  trials = [(f"peer worker, process {v} killed, heartbeat {heartbeat} s", v, None, heartbeat)
            for v in (1, 0)]
  for hb in [heartbeat] + ([0] if default_heartbeat else []):
    flags = train_flags(root / f"mp_hb{hb}" / "run", assets, steps=1000, every=50)
    command = [sys.executable, "-u", str(Path(__file__).resolve()), "child", f"--heartbeat={hb}",
               "--", *flags]
    trials.append((f"2-process training, process 1 killed at step 3, heartbeat "
                   f"{hb or 'default (100)'} s", 1, command, hb))
  bad = 0
  for i, (name, victim, command, hb) in enumerate(trials):
    kwargs = dict(command=command, after_line=r"^step 3 \|", watch=(0,), env_extra=cache) if command else {}
    t0 = time.monotonic()
    try:
      o = peer_death_trial(root / f"peers{i}", victim, heartbeat=hb, timeout=900, **kwargs)
    except RuntimeError as e:
      print(f"{name}: could not set up: {e}")
      bad += 1
      continue
    ok = o.survivor_rc not in (0, None) and bool(o.clear_error)
    bad += not ok
    print(f"{name}: survivor exited {o.survivor_rc} {o.exit_s:.1f} s after the kill "
          f"({time.monotonic() - t0:.0f} s in all){'' if ok else ' NOT CLEAN'}\n    {o.clear_error}")
  return bad


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "child":
    child_main(sys.argv[2:])
  elif len(sys.argv) > 1 and sys.argv[1] == "peer":
    peer_main(sys.argv[2:])
  else:
    sys.exit(main(sys.argv[1:]))
