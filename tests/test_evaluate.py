"""Evaluation: the Fréchet distance against closed forms, the digit classifier, prompt following, and a whole
``evaluate_run`` on a tiny untrained model's work directory."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from nextstep_jax import run as run_lib
from nextstep_jax.evaluation import classifier as clf_lib
from nextstep_jax.evaluation import digits as digits_eval
from nextstep_jax.evaluation import frechet
from nextstep_jax.data import digits
from tests.runs import make_base_run


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
  """The classifier trained once for the module (default recipe, seed 0): (dir, model, metrics)."""
  directory = str(tmp_path_factory.mktemp("classifier"))
  model, metrics = clf_lib.train_classifier(directory, seed=0)
  return directory, model, metrics


@pytest.fixture(scope="module")
def heldout():
  images, labels = digits.load_split("heldout")
  return digits.pad_digits_u8(images, 32), labels


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------

def _random_spd(rng, f):
  a = rng.normal(size=(f, f))
  return a @ a.T / f + 0.1 * np.eye(f)


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
  y = rng.normal(size=(200, 16)) + 0.5
  assert frechet.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  assert frechet.frechet_distance(x, y) == pytest.approx(frechet.frechet_distance(y, x), rel=1e-9)
  assert frechet.frechet_distance(x, y) > 1.0


def test_gaussian_frechet_distance_matches_closed_forms():
  rng = np.random.default_rng(1)
  f = 6
  mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
  assert frechet.gaussian_frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
  # Covariances sharing eigenvectors: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
  q, _ = np.linalg.qr(rng.normal(size=(f, f)))
  a, b = rng.uniform(0.1, 3.0, f), rng.uniform(0.1, 3.0, f)
  c1, c2 = (q * a) @ q.T, (q * b) @ q.T
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.gaussian_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)
  # General (non-commuting) covariances: tr sqrt(C1 C2) from the eigenvalues of the non-symmetric C1 C2.
  c1, c2 = _random_spd(rng, f), _random_spd(rng, f)
  tr_sqrt = np.sum(np.sqrt(np.real(np.linalg.eigvals(c1 @ c2))))
  want = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
  assert frechet.gaussian_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)
  # A singular covariance is fine (PSD square root).
  c_sing = np.diag([1.0, 0.0, 2.0, 0.0, 1.0, 3.0])
  assert np.isfinite(frechet.gaussian_frechet_distance(mu1, c_sing, mu2, c2))


def test_frechet_distance_of_samples_approaches_the_gaussians():
  rng = np.random.default_rng(2)
  f = 3
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
  c1, c2 = _random_spd(rng, f), _random_spd(rng, f)
  x = rng.multivariate_normal(mu1, c1, size=200_000)
  y = rng.multivariate_normal(mu2, c2, size=200_000)
  want = frechet.gaussian_frechet_distance(mu1, c1, mu2, c2)
  assert frechet.frechet_distance(x, y) == pytest.approx(want, rel=0.02)


def test_frechet_distance_rejects_bad_features():
  rng = np.random.default_rng(3)
  with pytest.raises(ValueError, match="feats_a has 4 features per row, feats_b 5"):
    frechet.frechet_distance(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
  with pytest.raises(ValueError, match="at least 2 rows"):
    frechet.frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))
  with pytest.raises(ValueError, match="feats_b must be \\(N, F\\)"):
    frechet.frechet_distance(rng.normal(size=(10, 4)), rng.normal(size=(10,)))
  bad = rng.normal(size=(10, 4))
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    frechet.frechet_distance(rng.normal(size=(10, 4)), bad)


# ------------------------------------------------------------------------------------------------
# The classifier and the judging functions
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_classifier_heldout_accuracy_and_files(judge, heldout):
  directory, model, metrics = judge
  assert metrics["heldout_accuracy"] >= 0.97, metrics
  images, labels = heldout
  logits = clf_lib.predict(model, images)
  assert logits.shape == (500, 10) and logits.dtype == np.float32
  assert clf_lib.features(model, images[:7]).shape == (7, model.config.feature_dim)
  # uint8 and [-1, 1] inputs are the same pixels.
  np.testing.assert_allclose(clf_lib.predict(model, digits.to_pixels(digits.load_split("heldout")[0])),
                             logits, rtol=1e-5, atol=1e-5)
  # Saved and reloaded: the same function; load_or_train reuses the files for the same recipe.
  loaded, meta = clf_lib.load_classifier(directory)
  # (Same batch on both sides: XLA may tile a batch of 50 differently from one of 500.)
  np.testing.assert_array_equal(clf_lib.predict(loaded, images[:50]), clf_lib.predict(model, images[:50]))
  np.testing.assert_allclose(clf_lib.predict(loaded, images[:50]), logits[:50], rtol=1e-5, atol=1e-5)
  assert meta["heldout_accuracy"] == metrics["heldout_accuracy"]
  weights = os.path.join(directory, clf_lib.WEIGHTS_FILE)
  mtime = os.stat(weights).st_mtime_ns
  _, meta2 = clf_lib.load_or_train_classifier(directory, seed=0)
  assert os.stat(weights).st_mtime_ns == mtime and meta2["recipe"] == metrics["recipe"]


@pytest.mark.slow
def test_classifier_rejects_bad_images(judge):
  _, model, _ = judge
  with pytest.raises(ValueError, match=r"images must be \(N, 32, 32, 3\)"):
    clf_lib.predict(model, np.zeros((4, 28, 28), np.uint8))
  with pytest.raises(ValueError, match=r"must be pixels in \[-1, 1\]"):
    clf_lib.predict(model, np.full((4, 32, 32, 3), 200.0, np.float32))
  with pytest.raises(ValueError, match="labels must be 4 integers"):
    digits_eval.prompt_following(model, np.zeros((4, 32, 32, 3), np.uint8), [1, 2, 3])


@pytest.mark.slow
def test_prompt_following_on_real_digits(judge, heldout):
  _, model, _ = judge
  images, labels = heldout
  assert digits_eval.prompt_following(model, images, labels) >= 0.97
  shuffled = np.random.default_rng(0).permutation(labels)
  assert 0.03 <= digits_eval.prompt_following(model, images, shuffled) <= 0.2


@pytest.mark.slow
def test_evaluate_generated_real_vs_real_and_noise(judge, heldout):
  _, model, _ = judge
  images, labels = heldout
  perm = np.random.default_rng(0).permutation(len(labels))
  a, b = perm[:250], perm[250:]
  real = digits_eval.evaluate_generated(model, images[a], labels[a], images[b])
  assert set(real) >= {"prompt_accuracy", "per_class_accuracy", "frechet_distance"}
  assert sorted(real["per_class_accuracy"]) == list(range(10))
  assert real["prompt_accuracy"] >= 0.95
  noise = np.random.default_rng(1).integers(0, 256, size=(250, 32, 32, 3), dtype=np.uint8)
  fake = digits_eval.evaluate_generated(model, noise, labels[a], images[b])
  assert fake["prompt_accuracy"] <= 0.3
  assert fake["frechet_distance"] > 10 * real["frechet_distance"], (real, fake)
  print(f"FD real-vs-real halves {real['frechet_distance']:.2f}, noise {fake['frechet_distance']:.2f}")


# ------------------------------------------------------------------------------------------------
# A whole run: a tiny untrained model, a random VAE, the demo tokenizer recipe on digit captions
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from configs import demo
  workdir = str(tmp_path_factory.mktemp("run"))
  config = demo.get_config()
  with config.unlocked():
    config.workdir = workdir
    config.vae.checkpoint = os.path.join(workdir, "vae")
  _, params = make_base_run(workdir, config, step=5, seed=0)
  return workdir, params


def test_load_trained_and_generate_digits(run_dir):
  workdir, params = run_dir
  run = run_lib.load_run(workdir)
  model, config, tokenizer, vae = run.model, run.config, run.tokenizer, run.vae
  assert config.data.image_size == 32 and run.step == 5
  restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  assert vae.config.token_dim == model.config.token_dim == 16
  assert tokenizer.decode(tokenizer.encode(digits_eval.PROMPT_TEMPLATE.format(d=7))) == "a handwritten digit 7"
  key = jax.random.key(0)
  imgs = digits_eval.generate_digits(model, config, tokenizer, vae, range(10), 1, key, cfg=3.0, steps=2)
  assert imgs.shape == (10, 32, 32, 3) and imgs.dtype == np.uint8
  again = digits_eval.generate_digits(model, config, tokenizer, vae, range(10), 1, key, cfg=3.0, steps=2)
  np.testing.assert_array_equal(imgs, again)
  np.testing.assert_array_equal(digits_eval.digit_labels([2, 5], 3), [2, 2, 2, 5, 5, 5])
  with pytest.raises(ValueError, match="digits must be a non-empty list of 0..9"):
    digits_eval.generate_digits(model, config, tokenizer, vae, [10], 1, key)


@pytest.mark.slow
def test_evaluate_run_writes_eval_json_and_grid(run_dir, judge):
  workdir, _ = run_dir
  result = digits_eval.evaluate_run(workdir, per_digit=1, cfg=3.0, steps=2, classifier_dir=judge[0],
                                 vae_eval_images=8)
  with open(os.path.join(workdir, digits_eval.EVAL_FILE)) as f:
    saved = json.load(f)
  expected = {"prompt_accuracy", "per_class_accuracy", "frechet_distance", "frechet_distance_real", "vae_psnr",
              "vae_ssim", "classifier_heldout_accuracy", "num_samples", "num_real", "per_digit",
              "prompt_template", "cfg", "sampling_steps", "seed", "checkpoint_step", "vae"}
  assert expected <= set(saved), expected - set(saved)
  assert saved["prompt_template"] == "a handwritten digit {d}"
  assert saved["num_samples"] == 10 and saved["num_real"] == 500 and saved["checkpoint_step"] == 5
  assert sorted(saved["per_class_accuracy"]) == [str(d) for d in range(10)]
  assert 0.0 <= saved["prompt_accuracy"] <= 1.0 and saved["frechet_distance"] >= 0.0
  assert saved["classifier_heldout_accuracy"] == judge[2]["heldout_accuracy"]
  assert saved["vae"]["num_images"] == 8 and np.isfinite(saved["vae_psnr"])
  assert saved["prompt_accuracy"] == result["prompt_accuracy"]
  with Image.open(os.path.join(workdir, digits_eval.GRID_FILE)) as im:
    assert im.size == (32, 10 * 32)  # one row per digit, per_digit columns


@pytest.mark.slow
def test_evaluate_run_with_a_few_step_head(run_dir, judge, tmp_path):
  """--head: the samples come from the head's weights with its K steps, cfg and time shift (its head.json, in
  place of the arguments), and eval.json and the grid go into the head's directory, the run's left alone."""
  from nextstep_jax.sampling import few_step  # pylint: disable=import-outside-toplevel
  workdir, _ = run_dir
  run_eval = os.path.join(workdir, digits_eval.EVAL_FILE)
  before = open(run_eval, "rb").read() if os.path.exists(run_eval) else None
  meta = {"evaluations": 3, "cfg": 2.0, "time_shift": 1.5, "use_norm": True, "teacher_steps": 28}
  own = run_lib.load_run(workdir).model.head
  changed = nnx.clone(own)  # other weights, the same settings: the samples must follow the weights
  rng = np.random.default_rng(0)  # random, not constant: a constant offset vanishes against the normed input
  changed.final_kernel[...] = changed.final_kernel[...] + rng.normal(size=changed.final_kernel.shape).astype(np.float32)
  grids = []
  for name, head in (("own", own), ("k3", changed)):
    few_step.save_head(str(tmp_path / name), head, meta)
    result = digits_eval.evaluate_run(workdir, per_digit=1, cfg=7.0, steps=20, time_shift=1.0,
                                      classifier_dir=judge[0], vae_eval_images=8, head=str(tmp_path / name))
    grids.append(open(os.path.join(tmp_path / name, digits_eval.GRID_FILE), "rb").read())
  assert grids[0] != grids[1]
  head_dir = str(tmp_path / "k3")
  with open(os.path.join(head_dir, digits_eval.EVAL_FILE)) as f:
    saved = json.load(f)
  assert (saved["sampling_steps"], saved["cfg"], saved["time_shift"], saved["head"]) == (3, 2.0, 1.5, head_dir)
  assert saved["prompt_accuracy"] == result["prompt_accuracy"] and saved["num_samples"] == 10
  assert os.path.isfile(os.path.join(head_dir, digits_eval.GRID_FILE))
  after = open(run_eval, "rb").read() if os.path.exists(run_eval) else None
  assert after == before
