"""The demo path end to end at toy size: VAE -> transformer with held-out eval, sample grid, EMA and a
profile -> sampling from the saved run with and without the EMA weights."""

import os

import jax
import numpy as np
import pytest

from nextstep_jax import run as run_lib
from configs import demo as demo_config
from configs import vae_demo
from nextstep_jax.training import loop
from nextstep_jax.sampling import runner
from nextstep_jax.interop import runs
from nextstep_jax.training import trainer as trainer_lib
from nextstep_jax import vae_tokens
from nextstep_jax.training import vae_trainer
from nextstep_jax.training import metrics
from nextstep_jax.training.checkpoint import restore_params_from

pytestmark = pytest.mark.slow   # every test reads the run trained once by run_dir (about a minute)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("e2e"))
  vcfg = vae_demo.get_config()
  vcfg.steps = 2
  vcfg.optim.warmup_steps = 1
  vcfg.eval.num_images = 20
  vae_trainer.train_and_evaluate(vcfg, os.path.join(root, "vae"))
  c = demo_config.get_config()
  with c.unlocked():
    c.workdir = root
    c.vae.checkpoint = os.path.join(root, "vae")
    c.steps = 4
    c.log_every = 2
    c.eval_every = 4
    c.eval_batches = 1
    c.optim.warmup_steps = 1
    c.model.num_layers = 2
    c.data.batch_size = 8
    c.checkpoint.every = 2
    c.ema_decay = 0.5
    c.profile_steps = "1,2"
    c.sample_prompts = ("a handwritten digit 3", "a handwritten digit 8")
  last = loop.train(c, root)
  return root, c, last


def test_run_logs_heldout_eval_samples_and_profile(run_dir):
  root, c, last = run_dir
  rows = metrics.read_jsonl(os.path.join(root, "metrics.jsonl"))
  keys = set().union(*(r.keys() for r in rows))
  for want in ("loss", "ce", "fm", "grad_norm", "lr", "tokens_per_s", "data_wait_s", "compute_s",
               "eval/pair/ce", "eval/pair/fm", "eval/edit/fm", "eval/text/ce"):
    assert want in keys, (want, sorted(keys))
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  # Achieved TFLOP/s from the analytic count; no MFU on CPU (no known peak).
  from nextstep_jax.training import flops
  logged = [r for r in rows if "tflops_per_device" in r]
  assert logged and "mfu" not in keys
  for r in logged:
    want = flops.step_flops(c) / r["step_time"] / jax.device_count() / 1e12
    assert r["tflops_per_device"] == pytest.approx(want, rel=1e-6)
  pngs = [f for _, _, fs in os.walk(root) for f in fs if f.startswith("samples") and f.endswith(".png")]
  assert pngs, "the periodic sample grid was not written"
  assert any(files for _, _, files in os.walk(os.path.join(root, "profile"))), "no profiler trace"
  assert os.path.isdir(os.path.join(root, "checkpoints", "4"))


def test_sampling_uses_ema_weights_when_asked(run_dir):
  root, c, _ = run_dir
  ema_model = run_lib.load_run(root, use_ema=True).model
  raw_model = run_lib.load_run(root, use_ema=False).model
  g, abstract, _ = trainer_lib.abstract_model(c)
  ckpt = os.path.join(root, "checkpoints", "4")
  ema = restore_params_from(ckpt, abstract, key="ema")
  raw = restore_params_from(ckpt, abstract, key="params")
  got_ema = np.asarray(ema_model.backbone.lm_head_kernel[...])
  got_raw = np.asarray(raw_model.backbone.lm_head_kernel[...])
  np.testing.assert_array_equal(got_ema, np.asarray(ema["backbone"]["lm_head_kernel"]))
  np.testing.assert_array_equal(got_raw, np.asarray(raw["backbone"]["lm_head_kernel"]))
  assert not np.array_equal(got_ema, got_raw)


def test_sample_cli_writes_images_and_edits(run_dir, tmp_path):
  root, _, _ = run_dir
  from PIL import Image
  stats = runner.sample_run(root, "a handwritten digit 5", out=str(tmp_path / "t2i"), num=3, steps=4)
  assert stats["images"] == 3 and stats["batch"] == 3 and "first_call_s" in stats  # timings are not asserted
  names = ["sample_000.png", "sample_001.png", "sample_002.png"]
  assert sorted(os.listdir(tmp_path / "t2i")) == ["grid.png"] + names
  # Two per call (the last call filled up to two): the same images, since image n draws from its own key.
  stats = runner.sample_run(root, "a handwritten digit 5", out=str(tmp_path / "t2i_b2"), num=3, steps=4, batch=2)
  assert stats["batch"] == 2 and stats["images_per_second"] > 0
  read = lambda d, n: np.asarray(Image.open(tmp_path / d / n), np.int16)
  for n in names:
    assert np.abs(read("t2i", n) - read("t2i_b2", n)).max() <= 1  # fp32 rounding may move a pixel one level
  assert len({read("t2i", n).tobytes() for n in names}) == 3
  src = tmp_path / "src.png"
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(src)  # grayscale 28x28: converted and resized
  runner.sample_run(root, "invert the colours", image=str(src), out=str(tmp_path / "edit"), num=1, steps=4)
  assert (tmp_path / "edit" / "sample_000.png").exists()
  with pytest.raises(FileNotFoundError, match="no such file"):
    runner.sample_run(root, "x", image=str(tmp_path / "missing.png"), num=1, steps=2)


def test_export_ships_ema_weights_tokenizer_and_vae_usable_from_python(run_dir, tmp_path):
  """README's Python API on an exported run: logits for text, images for a prompt."""
  from nextstep_jax import sampling
  from nextstep_jax.data.tokenizer import load_tokenizer
  from nextstep_jax.interop import hf
  from nextstep_jax.interop.vae import load_vae_dir
  root, c, _ = run_dir
  out = str(tmp_path / "hf")
  runs.export_workdir(root, out)
  model, _ = hf.load_nextstep(out)
  ema_model = run_lib.load_run(root, use_ema=True).model
  np.testing.assert_array_equal(np.asarray(model.backbone.lm_head_kernel[...]),
                                np.asarray(ema_model.backbone.lm_head_kernel[...]))
  tok = load_tokenizer(out)
  ids = np.asarray([tok.encode("a handwritten digit 7")])
  assert model.backbone.forward_logits(ids).shape == (1, ids.shape[1], c.model.vocab_size)
  cond, neg = sampling.image_prompts(tok, ["a handwritten digit 7"], 4, 4)
  tokens = sampling.sample_images(model, cond, neg, 4, 4, jax.random.key(0), cfg=3.0, steps=4, pad_id=tok.pad_id)
  images = vae_tokens.decode_tokens(load_vae_dir(os.path.join(out, "vae")), tokens, 4, 4)
  assert images.shape == (1, 32, 32, 3) and np.isfinite(np.asarray(images)).all()
  weights = sampling.sampler_weights(model, consume=True)  # README: laid out once, the model's copy freed
  again = sampling.sample_images(weights, cond, neg, 4, 4, jax.random.key(0), cfg=3.0, steps=4, pad_id=tok.pad_id)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(tokens))
