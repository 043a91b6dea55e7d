"""The one run loader (``nextstep_jax/run.py``) serves every reader of a finished run: sample, export,
evaluate, latents and DPO (policy and reference). A tiny run with two checkpoint steps whose newest is
corrupt: each reader succeeds, reads the previous good step (bitwise), logs a warning naming the corrupt
step, and moves nothing."""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nextstep_jax import run as run_lib
from nextstep_jax.training.checkpoint import Checkpointer
from tests.runs import jit_build, make_tiny_run, point_at, shrink

OLDER, NEWEST = 5, 9            # the run's steps; NEWEST is corrupted
VAE_OLDER, VAE_NEWEST = 3, 6    # the train_vae work directory's steps; VAE_NEWEST is corrupted

# orbax's reader leaves an asyncio callback behind when a restore raises; harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _truncate_largest_array_file(step_dir: str) -> None:
  """Truncates the largest array file of a step's state to half (as tests/test_checkpoint.py's
  ``_truncate(_largest_array_file(...))``): the step then fails its integrity check."""
  state = os.path.join(step_dir, "state")
  files = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs]
  arrays = [p for p in files if os.path.basename(os.path.dirname(p)) == "d"] or files
  biggest = max(arrays, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


def _listing(directory: str) -> dict[str, list[str]]:
  """Every directory below `directory` and its entries (to show that readers move nothing)."""
  return {os.path.relpath(d, directory): sorted(ds + fs) for d, ds, fs in os.walk(directory)}


def _assert_bitwise(got, want):
  flat_got, tree_got = jax.tree.flatten(got)
  flat_want, tree_want = jax.tree.flatten(want)
  assert tree_got == tree_want
  for a, b in zip(flat_got, flat_want):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def _assert_fell_back(caplog, directory: str, newest: int, older: int, times: int = 1) -> None:
  """A warning named the corrupt step `newest` of `directory` (`times` readers) and said step `older`
  was read instead."""
  msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  skipped = [m for m in msgs if f"step {newest} in {directory} is unusable" in m and f"trying step {older}" in m]
  read = [m for m in msgs if f"reading step {older} of {directory}, not the newest step {newest}" in m
          and f"step {newest}:" in m]
  assert len(skipped) >= times and len(read) >= times, msgs


def _assert_untouched(directory: str, before: dict, newest: int) -> None:
  assert _listing(directory) == before
  assert os.path.isdir(os.path.join(directory, str(newest)))
  assert not [n for n in os.listdir(directory) if ".corrupt" in n]


def _params(module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


@pytest.fixture(scope="module")
def corrupt_run(tmp_path_factory):
  """A finished tiny run: steps OLDER and NEWEST (different params), NEWEST's largest array file
  truncated. Returns (workdir, config, the params of step OLDER)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config, older = make_tiny_run(workdir, step=OLDER, seed=0)
  from nextstep_jax.models import nextstep as ns
  newer = _params(jit_build(lambda: ns.build_model(config, seed=1)))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(older), jax.tree.leaves(newer)))
  with Checkpointer(run_lib.checkpoint_dir(workdir), every=1, keep=2, async_save=False, config=config) as ckpt:
    ckpt.save(NEWEST, {"step": jnp.int32(NEWEST), "params": newer}, force=True)
    assert ckpt.all_steps() == [OLDER, NEWEST]
    _truncate_largest_array_file(os.path.join(run_lib.checkpoint_dir(workdir), str(NEWEST)))
    assert ckpt.verify(NEWEST) is not None and ckpt.verify(OLDER) is None
  return workdir, config, older


@pytest.fixture
def ckpt_dir(corrupt_run):
  directory = run_lib.checkpoint_dir(corrupt_run[0])
  before = _listing(directory)
  yield directory
  _assert_untouched(directory, before, NEWEST)


def _step_and_params(run):
  """A loaded run's step and params, copied to the host as it loads (the sampler then frees the model's
  layer weights: ``sampling.sampler_weights(consume=True)``)."""
  return run.step, jax.tree.map(np.asarray, _params(run.model))


def _spy(monkeypatch, module, name, keep=lambda out: out):
  """Wraps module.name; returns the list of what each call returned (`keep` of it, taken as it returns)."""
  seen, real = [], getattr(module, name)

  def wrapper(*args, **kwargs):
    out = real(*args, **kwargs)
    seen.append(keep(out))
    return out

  monkeypatch.setattr(module, name, wrapper)
  return seen


# ------------------------------------------------------------------------------------------------
# The readers
# ------------------------------------------------------------------------------------------------

def test_load_run_reads_the_previous_good_step(corrupt_run, ckpt_dir, caplog):
  workdir, _, older = corrupt_run
  caplog.set_level(logging.WARNING)
  run = run_lib.load_run(workdir)
  assert run.step == OLDER
  _assert_bitwise(_params(run.model), older)
  _assert_fell_back(caplog, ckpt_dir, NEWEST, OLDER)


def test_sample_falls_back(corrupt_run, ckpt_dir, caplog, monkeypatch, tmp_path):
  from nextstep_jax.sampling.runner import sample_run
  workdir, _, older = corrupt_run
  loaded = _spy(monkeypatch, run_lib, "load_run", keep=_step_and_params)
  caplog.set_level(logging.WARNING)
  stats = sample_run(workdir, "a handwritten digit 3", out=str(tmp_path), num=1, steps=2)
  assert stats["images"] == 1 and os.path.isfile(os.path.join(tmp_path, "sample_000.png"))
  assert len(loaded) == 1 and loaded[0][0] == OLDER
  _assert_bitwise(loaded[0][1], older)
  _assert_fell_back(caplog, ckpt_dir, NEWEST, OLDER)


def test_export_falls_back(corrupt_run, ckpt_dir, caplog, tmp_path):
  from nextstep_jax import export
  from nextstep_jax.interop import hf
  workdir, _, older = corrupt_run
  out = str(tmp_path / "hf")
  caplog.set_level(logging.WARNING)
  export.main(["--workdir", workdir, "--out", out])   # the CLI: python -m nextstep_jax.export
  cfg, _ = hf.read_nextstep_config(out)
  _assert_bitwise(hf.load_nextstep_params(out, cfg), older)
  _assert_fell_back(caplog, ckpt_dir, NEWEST, OLDER)


def test_evaluate_falls_back(corrupt_run, ckpt_dir, caplog, monkeypatch, tmp_path):
  from nextstep_jax.evaluation import classifier as clf_lib
  from nextstep_jax.evaluation import digits as digits_eval
  workdir, _, older = corrupt_run
  # A judge trained for a few steps (its quality does not matter here) instead of the 800-step recipe
  # evaluate_run would train.
  judge = clf_lib.train_classifier(None, seed=0, steps=3)
  monkeypatch.setattr(clf_lib, "load_or_train_classifier", lambda *a, **k: judge)
  loaded = _spy(monkeypatch, run_lib, "load_run", keep=_step_and_params)
  caplog.set_level(logging.WARNING)
  result = digits_eval.evaluate_run(workdir, per_digit=1, cfg=3.0, steps=2, classifier_dir=str(tmp_path),
                                    vae_eval_images=4, write=False, log=False)
  assert result["checkpoint_step"] == OLDER and result["num_samples"] == 10
  assert 0.0 <= result["prompt_accuracy"] <= 1.0 and math.isfinite(result["frechet_distance"])
  assert len(loaded) == 1 and loaded[0][0] == OLDER
  _assert_bitwise(loaded[0][1], older)
  _assert_fell_back(caplog, ckpt_dir, NEWEST, OLDER)


def test_latents_falls_back(tmp_path, caplog, monkeypatch):
  """latents' --vae_workdir: a train_vae work directory whose newest checkpoint is corrupt."""
  from absl import flags
  from absl.testing import flagsaver
  from PIL import Image
  from nextstep_jax import latents
  from nextstep_jax.models import vae as vae_lib
  from nextstep_jax.training import vae_trainer
  vae_dir = str(tmp_path / "vae_run")
  cfg = vae_lib.preset("demo")
  # Random weights (no initialiser to compile), different for each step.
  rng = np.random.default_rng(0)
  abstract = _params(vae_lib.abstract_vae(cfg))
  params = {s: jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
            for s in (VAE_OLDER, VAE_NEWEST)}
  os.makedirs(vae_dir)
  with open(os.path.join(vae_dir, vae_trainer.VAE_CONFIG_FILE), "w") as f:
    f.write(cfg.to_json())
  directory = os.path.join(vae_dir, run_lib.CHECKPOINTS)
  with Checkpointer(directory, every=1, keep=2, async_save=False) as ckpt:
    for step, p in params.items():
      ckpt.save(step, {"params": p}, force=True)
    assert ckpt.all_steps() == [VAE_OLDER, VAE_NEWEST]
  _truncate_largest_array_file(os.path.join(directory, str(VAE_NEWEST)))
  before = _listing(directory)
  images = tmp_path / "images"
  images.mkdir()
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
  out_dir = str(tmp_path / "tokens")

  loaded = _spy(monkeypatch, run_lib, "load_vae")
  caplog.set_level(logging.WARNING)
  if "vae_workdir" not in flags.FLAGS:
    latents._define_flags()  # pylint: disable=protected-access
  argv = ["latents", f"--vae_workdir={vae_dir}", f"--out_dir={out_dir}", f"--source={images}", "--split=all",
          "--image_size=32", "--batch_size=3", "--vae_dir="]
  with flagsaver.flagsaver():
    flags.FLAGS(argv)
    latents.main(None)   # the CLI: python -m nextstep_jax.latents --vae_workdir=...
  with open(os.path.join(out_dir, "all_latent_stats.json")) as f:
    assert np.all(np.isfinite(json.load(f)["channel_mean"]))
  assert len(loaded) == 1
  _assert_bitwise(_params(loaded[0]), params[VAE_OLDER])
  _assert_fell_back(caplog, directory, VAE_NEWEST, VAE_OLDER)
  _assert_untouched(directory, before, VAE_NEWEST)


@pytest.mark.slow
def test_dpo_policy_and_reference_fall_back(corrupt_run, ckpt_dir, caplog, capsys, monkeypatch, tmp_path):
  from configs import dpo_demo
  from nextstep_jax.evaluation import preferences as digit_prefs
  from nextstep_jax.training import dpo
  workdir, _, older = corrupt_run
  c = dpo_demo.get_config()
  with c.unlocked():
    shrink(c)
    point_at(c, workdir)   # policy and reference: the corrupt run's checkpoints
    prefs = str(tmp_path / "pairs")
    digit_prefs.build_digit_preferences(prefs, "train", 16, rejected="real")
    c.dpo.data = prefs
    c.dpo.heldout_batches = 0
    c.data.batch_size = 8
    c.steps, c.log_every, c.eval_every, c.optim.warmup_steps = 1, 1, 100, 1
  refs = _spy(monkeypatch, dpo.DPOTrainer, "load_reference")
  caplog.set_level(logging.WARNING)
  last = dpo.train_dpo(c, str(tmp_path / "dpo"))
  out = capsys.readouterr().out
  assert math.isfinite(last["loss"])
  # The policy: init_from's previous good step (the run's own checkpoints were empty: no resume).
  assert f"policy initialised from {c.checkpoint.init_from} (step {OLDER})" in out, out
  # The reference: the same step, bitwise; so at step 1 policy = reference and the loss is log 2.
  assert len(refs) == 1
  _assert_bitwise(refs[0], older)
  assert last["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
  _assert_fell_back(caplog, ckpt_dir, NEWEST, OLDER, times=2)
