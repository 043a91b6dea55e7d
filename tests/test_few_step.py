"""The few-step head: its distillation (nextstep_jax/training/head_distill.py), its files and how the sampler
selects it (nextstep_jax/sampling/few_step.py), and the command lines that use it."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax import config as config_lib
from nextstep_jax import run as run_lib
from nextstep_jax.config import UserError
from nextstep_jax.interop.safetensors_io import CheckpointError
from nextstep_jax.models import nextstep as ns
from nextstep_jax.sampling import few_step, flow, layout, prompts as prompts_lib
from nextstep_jax.sampling.sampler import sample_images
from nextstep_jax.training import head_distill
from tests import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lively(params):
  """A random model's params with its zero-initialised head outputs (adaLN, final layer) made random too,
  so the head's velocity depends on x, t and the condition."""
  key = jax.random.key(11)
  head = dict(params["head"])
  for i, name in enumerate(sorted(head)):
    x = jnp.asarray(head[name])
    if name.startswith(("ada", "final")):
      head[name] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
  return dict(params, head=head)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny run (the demo config shrunk, random weights with a lively head) in a temporary workdir."""
  workdir = str(tmp_path_factory.mktemp("few_step_run"))
  runs.make_tiny_run(workdir, step=3, transform=_lively)
  return workdir


@pytest.fixture(scope="module")
def loaded(tiny_run):
  return run_lib.load_run(tiny_run)


def _distill_config(teacher: str, out: str, **kw):
  c = config_lib.head_distill_base_config()
  c.teacher, c.out = teacher, out
  c.num_images, c.sample_batch = 20, 10
  c.train.steps, c.train.batch_tokens, c.train.log_every = 60, 64, 30
  c.optim.lr, c.optim.warmup_steps = 3e-3, 5
  for k, v in kw.items():
    c[k] = v
  return c


def _guided(head, x, t, pair, cfg):
  """Classifier-free guidance written out as the official head sampler combines its rows
  (v1 release, ``FlowMatchingHead.get_velocity_from_cfg``: v_uncond + cfg * (v_cond - v_uncond)), each row
  through the head's training layout."""
  tt = jnp.full((x.shape[0],), t, jnp.float32)
  vc, vu = head(x, tt, pair[:, 0]), head(x, tt, pair[:, 1])
  return vu + cfg * (vc - vu)


def _grid(n, shift):
  """The official shifted grid written out: u = linspace(0, 1, n + 1), t = u / (s - (s - 1) u)."""
  u = np.linspace(0.0, 1.0, n + 1, dtype=np.float32)
  return u / (shift - (shift - 1.0) * u)


# ---------------------------------------------------------------------------------------------------------
# The pieces, against the sampler they distil
# ---------------------------------------------------------------------------------------------------------

def test_conditions_are_what_the_sampler_saw(loaded):
  """Every token the compiled sampler drew is redrawn from the pool's conditions (teacher-forced through the
  backbone) with the same noise and the naive guided ODE: the conditions are the sampler's own."""
  model, tok = loaded.model, loaded.tokenizer
  h = w = 4
  texts = ["a handwritten digit 3", "digit 7"]
  key = jax.random.key(5)
  keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(2))
  cond, neg = prompts_lib.image_prompts(tok, texts, h, w, negative="")
  tokens = np.asarray(sample_images(model, cond, neg, h, w, keys, cfg=3.0, steps=6, sde=False, use_norm=True,
                                    pad_id=tok.pad_id))
  c = head_distill.token_conditions(model, cond, tokens)
  u = head_distill.token_conditions(model, neg, tokens)
  assert c.shape == (2, h * w, model.config.backbone.hidden_size)
  for i in range(h * w):
    x0, _ = flow.row_noise(keys, i, model.config.token_dim, 6, sde=False)
    pair = jnp.stack([jnp.asarray(c[:, i]), jnp.asarray(u[:, i])], axis=1)
    grid = _grid(6, 1.0)
    x = x0
    for j in range(6):  # the Euler ODE written out, the guidance as the official sampler combines it
      x = x + (grid[j + 1] - grid[j]) * _guided(model.head, x, grid[j], pair, 3.0)
    np.testing.assert_allclose(np.asarray(ns.normalize_tokens(x)), tokens[:, i], rtol=1e-4, atol=2e-5)
  # The negative row's conditions differ from the prompt's (guidance has something to act on).
  assert np.max(np.abs(c - u)) > 1e-3


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_teacher_points_are_the_n_step_ode(loaded, shift):
  """The teacher's points on the student's grid are every 7th point of the 28-step Euler ODE written out on the
  official shifted grid (the sampler's ODE, which tests/test_official_sampler.py holds to the same grid)."""
  model = loaded.model
  rng = np.random.default_rng(0)
  conds = jnp.asarray(rng.normal(size=(5, 2, model.config.backbone.hidden_size)), jnp.float32)
  x0 = jnp.asarray(rng.normal(size=(5, model.config.token_dim)), jnp.float32)
  pts = head_distill.teacher_points(model.head, x0, conds, k=4, sub=7, cfg=2.5, time_shift=shift)
  assert pts.shape == (5, 5, model.config.token_dim)
  np.testing.assert_array_equal(np.asarray(pts[0]), np.asarray(x0))
  # The 28-step Euler ODE on the official shifted grid, written out: every 7th point is one of the teacher's.
  grid = _grid(28, shift)
  x = x0
  for j in range(28):
    x = x + (grid[j + 1] - grid[j]) * _guided(model.head, x, grid[j], conds, 2.5)
    if (j + 1) % 7 == 0:
      np.testing.assert_allclose(np.asarray(pts[(j + 1) // 7]), np.asarray(x), rtol=1e-5, atol=2e-6)


def test_segment_loss_transcribes_its_formula(loaded):
  """distill_loss against the formula of the module docstring, written out in numpy on the same velocities."""
  model = loaded.model
  rng = np.random.default_rng(1)
  conds = jnp.asarray(rng.normal(size=(3, 2, model.config.backbone.hidden_size)), jnp.float32)
  pts = jnp.asarray(rng.normal(size=(3, 3, model.config.token_dim)), jnp.float32)  # K = 2
  loss, (seg, roll) = head_distill.distill_loss(model.head, pts, conds, k=2, cfg=4.0, time_shift=2.0,
                                                rollout_weight=0.5)
  t = _grid(2, 2.0)
  terms = []
  for i in range(2):
    v = np.asarray(_guided(model.head, pts[i], t[i], conds, 4.0))
    target = (np.asarray(pts[i + 1]) - np.asarray(pts[i])) / (t[i + 1] - t[i])
    terms.append(np.mean(np.sum((v - target) ** 2, axis=-1)))
  x = np.asarray(pts[0])
  for i in range(2):
    x = x + (t[i + 1] - t[i]) * np.asarray(_guided(model.head, jnp.asarray(x), t[i], conds, 4.0))
  want_roll = np.mean(np.sum((x - np.asarray(pts[2])) ** 2, axis=-1))
  np.testing.assert_allclose(float(seg), np.mean(terms), rtol=1e-5)
  np.testing.assert_allclose(float(roll), want_roll, rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(terms) + 0.5 * want_roll, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# A trained few-step head
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distilled(tiny_run, tmp_path_factory):
  """Two distillations with the same config and key, and one with another seed."""
  root = tmp_path_factory.mktemp("heads")
  metas = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    metas[name] = head_distill.distill_head(_distill_config(tiny_run, str(root / name), seed=seed), log=None)
  return root, metas


def test_distillation_is_deterministic_and_learns(distilled):
  root, metas = distilled
  read = lambda n: open(root / n / few_step.HEAD_FILE, "rb").read()
  assert read("a") == read("b"), "the same config and key trained different heads"
  assert read("a") != read("c"), "another seed trained the same head"
  m = metas["a"]
  assert m["evaluations"] == 4 and m["teacher_steps"] == 28 and m["teacher_steps_per_evaluation"] == 7
  # The student's 4-step token is closer to the teacher's 28-step one than the teacher's own 4 steps are.
  assert m["student_relative_error"] < 0.7 * m["teacher_k_step_relative_error"], m
  assert m["history"][-1]["loss"] < m["history"][0]["loss"]


def test_sampler_runs_k_evaluations(loaded, distilled, monkeypatch):
  """The compiled sampler with a few-step head evaluates the head K times per token (counted inside the
  compiled loop), against N times for the teacher; and the head's weights are the distilled ones."""
  root, _ = distilled
  model, tok = loaded.model, loaded.tokenizer
  calls = []
  real = layout.head_velocity

  def counted(hl, x_bd, ada_rd, groups):
    jax.debug.callback(lambda: calls.append(1))
    return real(hl, x_bd, ada_rd, groups)

  monkeypatch.setattr(layout, "head_velocity", counted)
  jax.clear_caches()
  h = w = 4
  cond, neg = prompts_lib.image_prompts(tok, ["digit 5"], h, w, negative="")
  student, meta = few_step.with_head(model, str(root / "a"))
  kw = few_step.sampling_kwargs(meta)
  assert kw == dict(steps=4, sde=False, cfg=3.0, time_shift=1.0, use_norm=True)
  out = jax.block_until_ready(sample_images(student, cond, neg, h, w, jax.random.key(0), pad_id=tok.pad_id, **kw))
  assert len(calls) == 4 * h * w
  calls.clear()
  teacher = jax.block_until_ready(sample_images(model, cond, neg, h, w, jax.random.key(0), pad_id=tok.pad_id,
                                                cfg=3.0, steps=28, sde=False))
  assert len(calls) == 28 * h * w
  assert not np.allclose(np.asarray(out), np.asarray(teacher))
  # with_head left the run's model as it was, and loaded the file's weights into the copy.
  saved = few_step.load_head_arrays(str(root / "a"), meta, model)
  for name, var in few_step.head_params(student.head).items():
    np.testing.assert_array_equal(np.asarray(var[...]), saved[name])
  assert not np.array_equal(np.asarray(model.head.final_kernel[...]), saved["final_kernel"])


def test_head_files_refused_clearly(loaded, distilled, tmp_path):
  root, _ = distilled
  model = loaded.model
  with pytest.raises(FileNotFoundError, match="no such directory"):
    few_step.with_head(model, str(tmp_path / "absent"))
  bad = tmp_path / "bad"
  bad.mkdir()
  with pytest.raises(FileNotFoundError, match="head.json"):
    few_step.with_head(model, str(bad))
  (bad / few_step.META_FILE).write_text("{not json")
  with pytest.raises(UserError, match="head.json: unreadable"):
    few_step.with_head(model, str(bad))
  meta = json.loads((root / "a" / few_step.META_FILE).read_text())
  (bad / few_step.META_FILE).write_text(json.dumps(dict(meta, evaluations="four")))
  with pytest.raises(UserError, match="'evaluations' is 'four'"):
    few_step.with_head(model, str(bad))
  (bad / few_step.META_FILE).write_text(json.dumps(dict(meta, head=dict(meta["head"], dim=64))))
  with pytest.raises(UserError, match="distilled for a head"):
    few_step.with_head(model, str(bad))
  (bad / few_step.META_FILE).write_text(json.dumps(meta))
  data = (root / "a" / few_step.HEAD_FILE).read_bytes()
  (bad / few_step.HEAD_FILE).write_bytes(data[:len(data) - 100])
  with pytest.raises(CheckpointError, match="truncated"):
    few_step.with_head(model, str(bad))


def test_config_refuses_bad_fields(tiny_run, tmp_path):
  c = _distill_config(tiny_run, str(tmp_path / "h"), evaluations=40)
  c.teacher_steps = 28
  c.cfg = -1.0
  with pytest.raises(config_lib.ConfigError) as e:
    head_distill.distill_head(c, log=None)
  assert "evaluations=40 is more than teacher_steps=28" in str(e.value) and "cfg=-1.0" in str(e.value)
  c = _distill_config(str(tmp_path / "nowhere"), str(tmp_path / "h"))
  with pytest.raises(config_lib.ConfigError, match="teacher="):
    head_distill.distill_head(c, log=None)


@pytest.mark.slow
def test_command_lines(tiny_run, distilled, tmp_path):
  """sample --head writes images with K evaluations; a flag the head fixes, and a bad distill config, are
  answered with one line and exit status 2."""
  root, _ = distilled
  env = dict(os.environ, PYTHONPATH=REPO)
  out = tmp_path / "samples"
  p = subprocess.run([sys.executable, "-m", "nextstep_jax.sample", f"--workdir={tiny_run}", "--prompt=digit 4",
                      f"--head={root / 'a'}", "--num=2", f"--out={out}"], capture_output=True, text=True, env=env,
                     cwd=str(tmp_path), timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["grid.png", "sample_000.png", "sample_001.png"]
  p = subprocess.run([sys.executable, "-m", "nextstep_jax.sample", f"--workdir={tiny_run}", "--prompt=digit 4",
                      f"--head={root / 'a'}", "--steps=10"], capture_output=True, text=True, env=env,
                     cwd=str(tmp_path), timeout=300)
  assert p.returncode == 2 and "drop --steps" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
  p = subprocess.run([sys.executable, "-m", "nextstep_jax.distill",
                      f"--config={os.path.join(REPO, 'configs', 'head_distill_demo.py')}",
                      f"--config.teacher={tmp_path / 'nowhere'}"], capture_output=True, text=True, env=env,
                     cwd=str(tmp_path), timeout=300)
  assert p.returncode == 2 and "teacher=" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
  p = subprocess.run([sys.executable, "-m", "nextstep_jax.evaluate", f"--workdir={tiny_run}",
                      f"--head={root / 'a'}", "--cfg=2"], capture_output=True, text=True, env=env,
                     cwd=str(tmp_path), timeout=300)
  assert p.returncode == 2 and "drop --cfg" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
