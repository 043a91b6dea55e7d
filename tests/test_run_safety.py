"""Run safety: one writer per work directory (the lock), a run's saved config and checkpoints never
overwritten by another architecture, and SIGINT at any moment (start-up and compilation included)
ending the run cleanly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nextstep_jax.config import ConfigError
from nextstep_jax.training import workdir_lock
from nextstep_jax.training.workdir_lock import ArchitectureChangedError, WorkdirLockedError

REPO = Path(__file__).resolve().parents[1]


def _fake_lock(workdir: Path, pid: int, host: str | None = None, heartbeat_age: float = 0.0) -> str:
  """A lock file as another run would have written it; returns its text."""
  info = {"host": host or socket.gethostname(), "pid": pid, "started": time.time() - 100,
          "heartbeat": time.time() - heartbeat_age, "token": "other", "command": "python -m nextstep_jax.train"}
  text = json.dumps(info)
  (workdir / workdir_lock.LOCK_FILE).write_text(text)
  return text


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _tree(root: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under root."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# (a) The lock
# ------------------------------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holder(tmp_path):
  assert issubclass(WorkdirLockedError, ConfigError) and issubclass(ArchitectureChangedError, ConfigError)
  # A live process on this host (the test's parent) holds it.
  text = _fake_lock(tmp_path, os.getppid())
  with pytest.raises(WorkdirLockedError) as e:
    workdir_lock.acquire(tmp_path)
  msg = str(e.value)
  assert str(tmp_path) in msg and f"pid {os.getppid()}" in msg and socket.gethostname() in msg, msg
  assert "another --workdir" in msg and len(msg.splitlines()) <= 2, msg
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == text  # untouched
  # Other processes of the same job are never refused (only process 0 locks).
  assert workdir_lock.acquire(tmp_path, process_index=1) is None
  # Held in this process: a second writer (in-process too) is refused, then it is free again.
  other = tmp_path / "other"
  other.mkdir()
  lock = workdir_lock.acquire(other)
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
    workdir_lock.acquire(other)
  info = json.loads((other / workdir_lock.LOCK_FILE).read_text())
  assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
  assert {"started", "heartbeat"} <= set(info)
  lock.release()
  assert not (other / workdir_lock.LOCK_FILE).exists()
  workdir_lock.acquire(other, heartbeat=False).release()


def test_stale_locks_are_recovered_with_a_warning(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.WARNING)
  # The holder's pid is dead on this host.
  dead = _dead_pid()
  _fake_lock(tmp_path, dead)
  lock = workdir_lock.acquire(tmp_path, heartbeat=False)
  assert f"pid {dead}" in caplog.text and "stale" in caplog.text and "is gone" in caplog.text
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  # Another host: only its heartbeat tells; fresh is held, older than NEXTSTEP_LOCK_STALE_S is stale.
  monkeypatch.setenv(workdir_lock.STALE_ENV, "60")
  _fake_lock(tmp_path, 1, host="elsewhere", heartbeat_age=10)
  with pytest.raises(WorkdirLockedError, match="host elsewhere, pid 1"):
    workdir_lock.acquire(tmp_path)
  caplog.clear()
  _fake_lock(tmp_path, 1, host="elsewhere", heartbeat_age=120)
  workdir_lock.acquire(tmp_path, heartbeat=False).release()
  assert "host elsewhere, pid 1" in caplog.text and "heartbeat" in caplog.text
  # An empty (half-written, then abandoned) lock file is recovered after its grace period.
  (tmp_path / workdir_lock.LOCK_FILE).write_text("")
  old = time.time() - 60
  os.utime(tmp_path / workdir_lock.LOCK_FILE, (old, old))
  workdir_lock.acquire(tmp_path, heartbeat=False).release()


def test_heartbeat_is_refreshed_while_held(tmp_path, monkeypatch):
  monkeypatch.setenv(workdir_lock.HEARTBEAT_ENV, "0.1")
  with workdir_lock.WorkdirLock(tmp_path) as lock:
    first = json.loads(Path(lock.path).read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads(Path(lock.path).read_text())["heartbeat"] == first and time.time() < deadline:
      time.sleep(0.05)
    assert json.loads(Path(lock.path).read_text())["heartbeat"] > first
  assert not Path(lock.path).exists()


def test_architecture_diff_names_the_fields():
  saved = {"model": {"num_layers": 4, "hidden_size": 128}, "lora": {"targets": ["q", "v"]}}
  now = {"model": {"num_layers": 2, "hidden_size": 128}, "lora": {"targets": ["q", "v"]}}
  assert workdir_lock.architecture_diff(saved, now, ("model.num_layers", "model.hidden_size",
                                                     "lora.targets", "head.dim")) == [
      "model.num_layers: 4 (saved) vs 2 (now)"]


# ------------------------------------------------------------------------------------------------
# The trainers under the guards
# ------------------------------------------------------------------------------------------------
# The shrunk demo on the train CLI (tests/runs.py shrink, as flags), one CPU device.
SHRUNK = ["--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
          "--config.model.head_dim=16", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
          "--config.model.vocab_size=128", "--config.tokenizer.vocab_size=128", "--config.head.dim=32",
          "--config.head.num_layers=1", "--config.data.batch_size=4", "--config.log_every=1",
          "--config.eval_every=1000", "--config.eval_batches=1", "--config.optim.warmup_steps=1",
          "--config.sample_prompts=()"]


def _cli(assets, workdir: Path, steps: int, every: int) -> tuple[list[str], dict[str, str]]:
  """(command, environment) of ``python -m nextstep_jax.train`` on the shrunk demo (it compiles:
  no persistent compilation cache)."""
  flags = ["--config=" + str(REPO / "configs" / "demo.py"), f"--workdir={workdir}",
           f"--config.workdir={workdir}", f"--config.steps={steps}", f"--config.checkpoint.every={every}",
           f"--config.vae.checkpoint={assets['vae']}", f"--config.tokenizer.path={assets['tokenizer']}",
           *SHRUNK]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", NEXTSTEP_DISTRIBUTED="0",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return [sys.executable, "-u", "-m", "nextstep_jax.train", *flags], env


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A random demo VAE (a train_vae workdir layout) and the demo tokenizer at vocabulary 128."""
  from tests import runs
  return runs.demo_assets(str(tmp_path_factory.mktemp("safety_assets")))


def _tiny_config(assets, workdir: Path, steps: int = 2):
  from configs import demo as demo_config
  from tests.runs import shrink
  c = demo_config.get_config()
  with c.unlocked():
    shrink(c)
    c.workdir = str(workdir)
    c.vae.checkpoint = assets["vae"]
    c.tokenizer.path = assets["tokenizer"]
    c.steps = steps
    c.log_every = 1
    c.eval_every = 1000
    c.sample_prompts = ()
    c.optim.warmup_steps = 1
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
  return c


def test_locked_workdir_is_refused_before_anything_is_written(assets, tmp_path):
  from configs import vae_demo
  from nextstep_jax.training import loop, vae_trainer
  work = tmp_path / "work"
  work.mkdir()
  _fake_lock(work, os.getppid())
  before = _tree(work)
  handler = signal.getsignal(signal.SIGINT)  # the default one, or SIG_IGN under a background shell
  with pytest.raises(WorkdirLockedError, match=str(work)):
    loop.train(_tiny_config(assets, work), str(work))
  vcfg = vae_demo.get_config()
  with pytest.raises(WorkdirLockedError, match=str(work)):
    vae_trainer.train_and_evaluate(vcfg, str(work))
  assert _tree(work) == before
  # The stop-signal handler was put back.
  assert signal.getsignal(signal.SIGINT) is handler


def test_stop_before_the_first_step_saves_nothing_and_releases_everything(assets, tmp_path, monkeypatch,
                                                                          capsys):
  """A SIGINT during start-up (here: while the data pipeline is built; the VAE trainer: while its
  images load) ends the run without an error, without a step, a saved config or the lock."""
  from configs import vae_demo
  from nextstep_jax.training import loop, vae_trainer

  def interrupted(fn):
    sent = []

    def wrapper(*args, **kwargs):
      out = fn(*args, **kwargs)
      if not sent:  # once: a second SIGINT exits at once (status 130)
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: no KeyboardInterrupt
      return out
    return wrapper

  monkeypatch.setattr(loop.mixture, "build_train_iterator", interrupted(loop.mixture.build_train_iterator))
  handler = signal.getsignal(signal.SIGINT)  # the default one, or SIG_IGN under a background shell
  work = tmp_path / "lm"
  assert loop.train(_tiny_config(assets, work, steps=50), str(work)) == {}
  assert "stop requested (SIGINT) before the first step" in capsys.readouterr().out
  assert not (work / "checkpoints").exists() and not (work / workdir_lock.LOCK_FILE).exists()
  assert signal.getsignal(signal.SIGINT) is handler

  monkeypatch.setattr(vae_trainer, "load_images", interrupted(vae_trainer.load_images))
  vwork = tmp_path / "vae"
  assert vae_trainer.train_and_evaluate(vae_demo.get_config(), str(vwork)) == {"stopped": "SIGINT"}
  assert sorted(os.listdir(vwork)) == []  # no config.json, vae_config.json, checkpoints or lock
  assert signal.getsignal(signal.SIGINT) is handler


def test_a_swallowed_keyboard_interrupt_still_stops_the_run():
  """A KeyboardInterrupt raised where Python can only report it ("Exception ignored in:
  <function _xla_gc_callback ...>") becomes a stop request instead of vanishing."""
  import types
  from nextstep_jax.training import loop
  stop = loop.StopSignal(install=False)
  assert not stop.requested
  reported = []
  loop._note_swallowed_interrupt(types.SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt()),
                                 _previous=reported.append)  # pylint: disable=protected-access
  assert reported and stop.requested and stop.reason == "SIGINT"
  with pytest.raises(loop.Stopped, match="before the first step"):
    stop.check()
  assert not loop.StopSignal(install=False).requested  # consumed by the run it stopped


# ------------------------------------------------------------------------------------------------
# (b) A run's saved config and checkpoints are not overwritten by another architecture
# ------------------------------------------------------------------------------------------------
def test_resume_with_another_architecture_is_refused_and_changes_nothing(assets, tmp_path):
  from nextstep_jax.training import loop
  work = tmp_path / "run"
  command, env = _cli(assets, work, steps=2, every=1)
  proc = subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert (work / "checkpoints" / "2").is_dir() and not (work / workdir_lock.LOCK_FILE).exists()
  saved = json.loads((work / "checkpoints" / "config.json").read_text())
  assert saved["model"]["num_layers"] == 1
  before = _tree(work)
  changed = _tiny_config(assets, work, steps=4)
  with changed.unlocked():
    changed.model.num_layers = 2
  with pytest.raises(ArchitectureChangedError) as e:
    loop.train(changed, str(work))
  msg = str(e.value)
  assert "model.num_layers: 1 (saved) vs 2 (now)" in msg and "new --workdir" in msg, msg
  assert "model.hidden_size" not in msg
  # The saved config, every checkpoint file, the tokenizer and metrics: byte for byte as before.
  assert _tree(work) == before
  assert not (work / workdir_lock.LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------
# (c) SIGINT during start-up / compilation of the CLI
# ------------------------------------------------------------------------------------------------
def test_sigint_during_compilation_ends_the_cli_run_cleanly(assets, tmp_path):
  """The documented outcome of SIGINT (and SIGTERM): exit status 0, the step in flight saved, or
  nothing at all before the first step; never a KeyboardInterrupt swallowed and the run trained on."""
  work = tmp_path / "cli"
  steps = 1000
  command, env = _cli(assets, work, steps=steps, every=500)
  proc = subprocess.Popen(command, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1)
  lines = []
  try:
    deadline = time.monotonic() + 120
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("parameters:") or time.monotonic() > deadline:
        break
    assert any(line.startswith("parameters:") for line in lines), "".join(lines)
    assert (work / workdir_lock.LOCK_FILE).exists()  # held while it runs
    proc.send_signal(signal.SIGINT)  # now: checkpoints opened, the state initialised and compiled
    rest, _ = proc.communicate(timeout=90)  # a run that trained on to the end would time out here
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out = "".join(lines) + rest
  assert proc.returncode == 0, out[-4000:]
  assert "stop requested (SIGINT)" in out, out[-2000:]
  for bad in ("KeyboardInterrupt", "Exception ignored", "Traceback"):
    assert bad not in out, out[-4000:]
  # It did not train on: no final checkpoint, at most the step in flight saved and logged.
  steps_saved = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()] \
      if (work / "checkpoints").is_dir() else []
  assert all(s < 5 for s in steps_saved), steps_saved
  if not steps_saved:  # stopped before the first step: not even the config was written
    assert "before the first step" in out and not (work / "checkpoints" / "config.json").exists()
  metrics = work / "metrics.jsonl"
  assert not metrics.exists() or len(metrics.read_text().splitlines()) < 5
  assert not (work / workdir_lock.LOCK_FILE).exists()


def test_data_cache_goes_under_the_run_workdir_not_the_current_directory(tmp_path, monkeypatch):
  """The stdlib-docstring cache of the text source lands in <workdir>/cache of the run being trained,
  even when config.workdir (a relative default such as runs/demo) names another place."""
  from nextstep_jax.data import mixture
  from nextstep_jax.data import tokenizer as tok_lib
  from tests.test_mixture import demo_config
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  config = demo_config("runs/demo")            # the relative default the configs ship with
  run_dir = tmp_path / "run"
  tok = tok_lib.build_demo_tokenizer(str(run_dir), vocab_size=512)
  it = mixture.build_train_iterator(config, tok, workdir=str(run_dir))
  next(it)
  assert any((run_dir / "cache").glob("stdlib_docstrings_*.json"))
  assert not any(cwd.iterdir()), sorted(p.name for p in cwd.rglob("*"))


@pytest.mark.parametrize("module", ["nextstep_jax.train", "nextstep_jax.train_vae"])
def test_sigint_while_starting_up_ends_without_a_traceback(tmp_path, module):
  """Ctrl-C while the entry point still imports jax and parses its flags (before the run's own handler
  exists): the process ends at once, status 130, no KeyboardInterrupt traceback, nothing written."""
  config = "configs/demo.py" if module.endswith(".train") else "configs/vae_demo.py"
  work = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", module, f"--config={config}", f"--workdir={work}"],
                          cwd=str(REPO), env=dict(os.environ), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  time.sleep(0.5)  # inside the imports (jax alone takes seconds to import here)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode in (0, 130), out[-3000:]
  for bad in ("Traceback", "KeyboardInterrupt"):
    assert bad not in out, out[-3000:]
  assert not (work / "checkpoints").exists()
