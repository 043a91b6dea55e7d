"""Two jax processes on this machine (launch/local.sh): the demo trains to the same losses as one process
fed the same global batches, and a run stopped at step 10 resumes in both processes to step 20.

The demo's pixel path needs a VAE: a freshly initialised one is exported into a workdir (the VAE is frozen
in the step, so its weights only need to be the same in both runs). The demo tokenizer is trained once
and shared through tokenizer.path. The schedule is made constant after a short warm-up so the 10-step
and 20-step invocations see the same learning rates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx


from nextstep_jax import overrides as overrides_lib
from nextstep_jax import run as run_lib
from nextstep_jax.training import trainer as trainer_lib
from nextstep_jax.training import vae_trainer

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


def _overrides(tmp_path) -> dict:
  return {
      "steps": STEPS, "log_every": 1, "optim.schedule": "constant", "optim.warmup_steps": 2,
      "eval_batches": 1, "sample_prompts": (),
      "checkpoint.every": 5, "checkpoint.async_save": False,
      "tokenizer.path": str(tmp_path / "shared" / "tokenizer"),
      "vae.checkpoint": str(tmp_path / "vae"),
  }


def _as_flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A random demo VAE workdir and the demo tokenizer, written once."""
  from nextstep_jax.data import tokenizer as tok_lib
  from nextstep_jax.interop import vae as vae_interop
  from nextstep_jax.models import vae as vae_lib
  tmp = tmp_path_factory.mktemp("mp")
  vae_cfg = vae_lib.VAEConfig.from_dict(overrides_lib.load_config(os.path.join(REPO, "configs/vae_demo.py"), check=False).vae.to_dict())
  vae = vae_lib.AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0))
  vae_interop.export_vae(vae, str(tmp / "vae" / vae_trainer.EXPORT_DIR))
  with open(tmp / "vae" / vae_trainer.VAE_CONFIG_FILE, "w", encoding="utf-8") as f:
    json.dump(vae_cfg.to_dict(), f)
  tok_lib.build_demo_tokenizer(str(tmp / "shared"), vocab_size=512)
  return tmp


def _reference_losses(config, steps: int, process_count: int) -> list[float]:
  """One process, one device: the global batch of each step is the concatenation of what the
  `process_count` processes' iterators yield (exactly what the multi-process run assembles)."""
  from nextstep_jax import parallel
  from nextstep_jax.data import mixture
  from nextstep_jax.data import tokenizer as tok_lib
  tokenizer = tok_lib.load_tokenizer(config.tokenizer.path, config.tokenizer.kind)
  iters = [mixture.build_train_iterator(config, tokenizer, i, process_count) for i in range(process_count)]
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(config, mesh, vae=run_lib.vae_encoder(config))
  state = trainer.init_state(config.seed)
  losses = []
  for _ in range(steps):
    parts = [next(it) for it in iters]
    local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = trainer.step_fn(state, parallel.global_batch(local, mesh))
    losses.append(float(metrics["loss"]))
  return losses


def _launch(n: int, workdir, overrides: dict, log_dir) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir), QUIET="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  # One CPU device per process (local.sh adds the count); keep conftest's fast-compiling XLA level.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  # config.workdir too: the data cache follows it (the demo's default, runs/demo, is relative to the
  # repository local.sh runs in), and tests write nothing into the checkout.
  cmd = ["bash", os.path.join(REPO, "launch", "local.sh"), str(n), "--config=configs/demo.py",
         f"--workdir={workdir}"] + _as_flags(dict(overrides, workdir=str(workdir)))
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def _logs(log_dir) -> str:
  out = []
  for name in sorted(os.listdir(log_dir)):
    with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
      out.append(f"---- {name}\n" + "".join(f.readlines()[-30:]))
  return "\n".join(out)


def _logged_losses(workdir) -> dict[int, float]:
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        losses[int(row["step"])] = float(row["loss"])
  return losses


def test_local_sh_rejects_bad_process_count():
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "zero"], capture_output=True,
                     text=True, check=False)
  assert r.returncode == 2 and "usage" in r.stderr


_HYBRID_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from nextstep_jax import parallel
parallel.maybe_initialize_distributed()
mesh = parallel.make_hybrid_mesh(dict(axes=dict(data=1, fsdp=-1, tensor=1), dcn_axes=dict(data=-1)))
rows = np.full((2,), jax.process_index() + 1.0)
x = jax.make_array_from_process_local_data(parallel.data_sharding(mesh), rows)
owners = sorted({d.process_index for d in mesh.devices[jax.process_index()].ravel()})
print("RESULT", jax.process_index(), dict(mesh.shape), owners, float(jax.jit(jnp.sum)(x)), flush=True)
"""


def test_hybrid_mesh_puts_each_process_on_its_own_dcn_row(tmp_path):
  """Three processes of two CPU devices: the DCN data axis spans processes, FSDP stays inside one."""
  (tmp_path / "hybrid_probe.py").write_text(_HYBRID_PROBE)
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"), QUIET="1",
             MODULE="hybrid_probe", DEVICES_PER_PROCESS="2",
             PYTHONPATH=os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "3"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr + _logs(tmp_path / "logs")
  for i in range(3):
    line = [l for l in open(tmp_path / "logs" / f"process_{i}.log", encoding="utf-8") if l.startswith("RESULT")]
    assert line == [f"RESULT {i} {{'data': 3, 'fsdp': 2, 'tensor': 1}} [{i}] 12.0\n"], line


@pytest.mark.slow
def test_two_processes_match_one_and_resume(assets, tmp_path):
  overrides = _overrides(assets)
  workdir = tmp_path / "run"
  # Steps 1..10 in two processes, then a second invocation resumes both from the step-10 checkpoint.
  first = _launch(2, workdir, dict(overrides, steps=10), tmp_path / "logs1")
  assert first.returncode == 0, first.stderr + _logs(tmp_path / "logs1")
  ckpts = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert ckpts[-1] == 10, ckpts
  data_states = sorted(os.listdir(workdir / "checkpoints" / "10" / "data"))
  assert [n for n in data_states if n.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]
  # The resumed half runs on the hybrid mesh path: one process per DCN granule along data.
  second = _launch(2, workdir, dict(overrides, **{"mesh.dcn_axes.data": 2}), tmp_path / "logs2")
  assert second.returncode == 0, second.stderr + _logs(tmp_path / "logs2")
  log0 = open(tmp_path / "logs2" / "process_0.log", encoding="utf-8").read()
  assert "resumed from step 10" in log0 and "processes 2" in log0, log0[-2000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in log0, log0[-2000:]

  logged = _logged_losses(workdir)
  assert sorted(logged) == list(range(1, STEPS + 1)), sorted(logged)
  config = overrides_lib.load_config(os.path.join(REPO, "configs/demo.py"), dict(overrides, workdir=str(workdir)))
  ref = _reference_losses(config, STEPS, process_count=2)
  np.testing.assert_allclose([logged[s] for s in range(1, STEPS + 1)], ref, rtol=1e-5, atol=1e-6)
