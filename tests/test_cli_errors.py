"""A user's mistake on the command line is answered with ``error: <message>`` (naming the flag, field or
file) and exit status 2, never a traceback (nextstep_jax/cli.py); ``NEXTSTEP_DEBUG=1`` shows it.

Each case runs an entry point as a subprocess (``python -m nextstep_jax.X``, cwd the checkout, outputs
under tmp_path); the sampler's cases share one tiny finished run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import make_tiny_run

REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args: str, debug: bool = False, timeout: int = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("NEXTSTEP_DEBUG", None)
  if debug:
    env["NEXTSTEP_DEBUG"] = "1"
  return subprocess.run([sys.executable, "-m", f"nextstep_jax.{module}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def user_error(proc: subprocess.CompletedProcess, *names: str, max_lines: int = 3) -> str:
  """Asserts the answer to a user error: status 2, a short `error:` on stderr naming `names`."""
  err = proc.stderr
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert proc.returncode == 2, f"status {proc.returncode}\n{err[-3000:]}"
  assert "Traceback" not in err, err[-3000:]
  assert len(lines) <= max_lines and lines[0].startswith("error: "), err[-3000:]
  for name in names:
    assert name in err, (name, err)
  return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  make_tiny_run(workdir, step=3, seed=0)
  return workdir


# ------------------------------------------------------------------------------------------------
# Training CLIs: --config and its overrides
# ------------------------------------------------------------------------------------------------

def test_bad_config_value(tmp_path):
  proc = cli("train", "--config=configs/demo.py", "--config.optim.lr=-1", "--config.data.payload=image_tokens",
             f"--workdir={tmp_path / 'w'}")
  user_error(proc, "optim.lr", max_lines=4)   # "invalid config:" and one line per problem
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_unknown_config_key_names_the_closest(tmp_path):
  proc = cli("train", "--config=configs/demo.py", "--config.optim.foo=1", f"--workdir={tmp_path}")
  err = user_error(proc, "optim.foo", "closest: optim.", "known under optim:", max_lines=1)
  assert "optim.lr" in err


def test_unknown_config_key_with_debug_shows_the_traceback(tmp_path):
  proc = cli("train", "--config=configs/demo.py", "--config.optim.foo=1", f"--workdir={tmp_path}", debug=True)
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "optim.foo" in proc.stderr


def test_missing_config_file(tmp_path):
  proc = cli("train_vae", "--config=configs/nope.py", f"--workdir={tmp_path}")
  user_error(proc, "configs/nope.py", "no such config file", max_lines=1)


def test_value_of_the_wrong_type(tmp_path):
  user_error(cli("dpo", "--config=configs/demo.py", "--config.optim.lr=abc", f"--workdir={tmp_path}"),
             "--config.optim.lr=abc", max_lines=1)


# ------------------------------------------------------------------------------------------------
# The sampler
# ------------------------------------------------------------------------------------------------

def test_sample_missing_workdir(tmp_path):
  user_error(cli("sample", f"--workdir={tmp_path / 'nope'}", "--prompt=a handwritten digit 3"),
             "--workdir", str(tmp_path / "nope"), max_lines=1)


def test_sample_image_that_is_a_directory(tiny_run, tmp_path):
  err = user_error(cli("sample", f"--workdir={tiny_run}", "--prompt=invert", f"--image={tmp_path}",
                       f"--out={tmp_path / 'out'}"), "--image", "is a directory", max_lines=1)
  assert "--config" not in err


def test_sample_empty_prompt_and_negative_guidance(tiny_run, tmp_path):
  user_error(cli("sample", f"--workdir={tiny_run}", f"--out={tmp_path}"), "--prompt is empty", "--unconditional",
             max_lines=1)
  user_error(cli("sample", f"--workdir={tiny_run}", "--prompt=a handwritten digit 3", "--cfg=-1",
                 f"--out={tmp_path}"), "--cfg=-1", ">= 0", max_lines=1)


def test_sample_prompt_longer_than_the_context(tiny_run, tmp_path):
  proc = cli("sample", f"--workdir={tiny_run}", "--prompt=" + "7 " * 30_000, f"--out={tmp_path}")
  user_error(proc, "--prompt is too long", "context of 128", "data.seq_len", max_lines=1)
  assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# The library behind the sampler (in process)
# ------------------------------------------------------------------------------------------------

def test_sample_run_checks_and_unconditional(tiny_run, tmp_path):
  from nextstep_jax.config import UserError  # pylint: disable=import-outside-toplevel
  from nextstep_jax.sampling import runner  # pylint: disable=import-outside-toplevel
  bad = [(dict(prompt=""), "--prompt is empty"), (dict(prompt="x", unconditional=True), "--unconditional"),
         (dict(prompt="x", cfg=-0.5), "--cfg=-0.5"), (dict(prompt="x", cfg_img=-1.0), "--cfg_img"),
         (dict(prompt="x", steps=0), "--steps=0"), (dict(prompt="x", steps=1), "--steps=1 must be >= 2"),
         (dict(prompt="x", steps=0, sde=False), "--steps=0 must be >= 1"),
         (dict(prompt="x", cfg_schedule="cosine"), "--cfg_schedule='cosine'"),
         (dict(prompt="x", dtype="float16"), "--dtype='float16'"), (dict(prompt="x", num=0), "--num=0"),
         (dict(prompt="x", batch=-2), "--batch=-2 must be >= 0"),
         (dict(prompt="x", mesh="fsdp=3"), "--mesh=fsdp=3: .*does not divide"),
         (dict(prompt="x", mesh="pipeline=2"), "--mesh='pipeline=2': expected axis=size pairs"),
         (dict(prompt="x", time_shift=0.0), "--time_shift"), (dict(prompt="x", size=20), "--size=20")]
  for kwargs, match in bad:
    with pytest.raises(UserError, match=match):
      runner.sample_run(tiny_run, **kwargs, out=str(tmp_path / "never"))
  not_image = tmp_path / "not_an_image.png"
  not_image.write_text("plain text")
  with pytest.raises(UserError, match="not a readable image"):
    runner.sample_run(tiny_run, "invert", image=str(not_image), num=1, steps=2, out=str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()
  stats = runner.sample_run(tiny_run, "", unconditional=True, num=1, steps=2, out=str(tmp_path / "u"))
  assert stats["images"] == 1 and (tmp_path / "u" / "sample_000.png").exists()
