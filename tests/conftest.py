"""Test setup: 8 virtual CPU devices for mesh tests (must be set before jax is imported), and a
faster-compiling XLA CPU backend (optimisation level 0 compiles about 3x faster; tests run tiny
models where compile time, not run time, dominates).

Also a session-wide guard: tests write under tmp_path, never into the checkout. Files that appear
in the repository during the session (untracked or git-ignored) fail the session, named. Not
counted: Python's and pytest's caches, the virtual environment, and files of the kinds people write
by hand (sources, docs, scripts), so that editing the checkout while tests run is no failure."""

import os
import subprocess
from pathlib import Path

import pytest

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_REPO = Path(__file__).resolve().parents[1]
_NOT_OUTPUT = {"__pycache__", ".pytest_cache", ".venv", "venv"}  # path components never counted
_AUTHORED = (".py", ".pyi", ".md", ".rst", ".sh", ".sbatch", ".txt", ".ini", ".cfg", ".toml", ".pyc")


def untracked_paths(repo: Path = _REPO) -> set[str] | None:
  """Files of the checkout that git does not track (ignored ones included, one entry per file), or
  None where there is no git checkout to ask."""
  cmd = ["git", "-C", str(repo), "status", "--porcelain=v1", "-z", "--untracked-files=all",
         "--ignored=traditional", "--", ".", ":(exclude).venv", ":(exclude)venv"]
  try:
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=120).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  paths = set()
  for entry in out.decode("utf-8", "surrogateescape").split("\0"):
    if entry[:3] in ("?? ", "!! "):
      path = entry[3:]
      if not _NOT_OUTPUT.intersection(path.split("/")) and not path.endswith(_AUTHORED):
        paths.add(path)
  return paths


@pytest.fixture(scope="session", autouse=True)
def _tests_write_nothing_into_the_checkout():
  before = untracked_paths()
  yield
  after = untracked_paths() if before is not None else None
  if after is None:
    return
  new = sorted(after - before)
  if new:
    shown = "\n  ".join(new[:30]) + (f"\n  ... and {len(new) - 30} more" if len(new) > 30 else "")
    pytest.fail(f"the tests wrote {len(new)} new path(s) into the repository {_REPO} (write under "
                f"tmp_path instead):\n  {shown}", pytrace=False)
