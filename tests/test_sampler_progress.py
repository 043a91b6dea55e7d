"""A sampler call's progress heard from inside its compiled loop (``sampling.reporting``), and the sample
command's progress lines."""

import io

import numpy as np
import jax
import pytest

from nextstep_jax import sampling
from nextstep_jax.sampling import runner
from tests.test_sampling import _prompt, _random_model


def test_the_loop_reports_every_nth_token_and_the_last_and_samples_the_same():
  model = _random_model(4)
  rng = np.random.default_rng(5)
  ps = [_prompt(rng, [6, 4], 7), _prompt(rng, [3, 5], 5)]
  kw = dict(cfg=2.5, steps=3, sde=True)
  key = jax.random.key(6)
  quiet = np.asarray(sampling.sample_guided(model, ps, 2, 3, key, **kw))
  for every, want in ((2, [2, 4, 6]), (4, [4, 6]), (1, [1, 2, 3, 4, 5, 6]), (7, [6])):
    heard = []
    with sampling.reporting(lambda done, total: heard.append((done, total))):
      got = np.asarray(jax.block_until_ready(sampling.sample_guided(model, ps, 2, 3, key, progress_every=every,
                                                                    **kw)))
    np.testing.assert_array_equal(got, quiet)  # reporting changes nothing sampled
    assert sorted(heard) == [(d, 6) for d in want], (every, heard)
  # No listener: the callback runs and nobody hears it; a listener left the context hears nothing more.
  heard = []
  with sampling.reporting(lambda done, total: heard.append(done)):
    pass
  np.testing.assert_array_equal(np.asarray(jax.block_until_ready(
      sampling.sample_guided(model, ps, 2, 3, key, progress_every=2, **kw))), quiet)
  assert heard == []
  with pytest.raises(ValueError, match="progress_every=-1"):
    sampling.sample_guided(model, ps, 2, 3, key, progress_every=-1, **kw)


def test_sample_command_progress_lines():
  assert runner.progress_every(16) == 0 and runner.progress_every(runner.PROGRESS_MIN_TOKENS - 1) == 0
  assert runner.progress_every(1024) == 128 and runner.progress_every(256) == 32
  out = io.StringIO()
  lines = runner.ProgressLines("images 0..3", 0.0, stream=out)
  for done in (128, 384, 256, 384, 1024):  # heard out of order and twice: each step once, forwards
    lines(done, 1024)
  text = out.getvalue().splitlines()
  assert [t.split(": token ")[1].split(",")[0] for t in text] == ["128/1024 (12%)", "384/1024 (37%)",
                                                                  "1024/1024 (100%)"]
  assert all(t.startswith("sample: images 0..3: token ") and t.endswith(" s") for t in text)
