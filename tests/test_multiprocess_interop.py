"""Import and export across processes (launch/local.sh: jax.distributed over localhost, one CPU device
each, the multi-host path of a pod): each process reads, holds and writes only its shards, and the round
trip official -> run -> official is still bitwise. The memory this saves is measured by
benchmarks/interop_memory.py."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from nextstep_jax import run as run_lib
from nextstep_jax.interop import safetensors_io
from tests.test_official_import import official_dir

pytestmark = pytest.mark.multiprocess
torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _local(n: int, args: list[str], log_dir) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir), QUIET="1", MODULE="nextstep_jax.export",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_backend_optimization_level=0")
  return subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), str(n), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


def _logs(log_dir) -> str:
  return "\n".join(open(os.path.join(log_dir, f), encoding="utf-8", errors="replace").read()[-2000:]
                   for f in sorted(os.listdir(log_dir)))


def test_two_processes_import_and_export_the_official_layout_bitwise(tmp_path):
  src, tensors, _ = official_dir(tmp_path, "1.0")
  work, back = tmp_path / "run", tmp_path / "back"
  r = _local(2, [f"--import_dir={src}", f"--out={work}"], tmp_path / "logs_import")
  assert r.returncode == 0, _logs(tmp_path / "logs_import")
  # The checkpoint holds every param once, written by both processes (each its share of the pieces, into its
  # own OCDBT database, which orbax merged).
  state = work / "checkpoints" / "0" / "state"
  for p in (0, 1):
    data = state / f"ocdbt.process_{p}" / "d"
    assert data.is_dir() and sum(f.stat().st_size for f in data.iterdir()) > 10_000, (p, sorted(os.listdir(state)))
  run = run_lib.load_run(str(work))
  assert run.model.backbone.layers.q_kernel[...].shape[0] == 2
  r = _local(2, [f"--workdir={work}", f"--out={back}", "--dtype=bfloat16"], tmp_path / "logs_export")
  assert r.returncode == 0, _logs(tmp_path / "logs_export")
  out = safetensors_io.TensorDir(str(back))
  assert sorted(out.names()) == sorted(tensors)
  for name, t in tensors.items():
    np.testing.assert_array_equal(out.get(name).view(np.int16), t.view(torch.int16).numpy(), err_msg=name)
