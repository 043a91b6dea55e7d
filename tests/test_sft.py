"""SFT: loss only on the response (prompt masking in sequences and the mixture), the SFT configs, and
the demo-sized SFT run end to end from another run's checkpoint, with checkpoint and resume."""

import json
import os

import numpy as np
import pytest

from nextstep_jax.data import mixture as M
from nextstep_jax.data import settings as settings_lib
from nextstep_jax.data import tokenizer as T
from nextstep_jax.batch import IGNORE
from nextstep_jax.data.sequences import SequenceBuilder
from tests.runs import make_base_run, point_at, shrink
from tests.test_sequences import AREA, EOI, EOS, CharTokenizer, block, enc, expected_targets, px


@pytest.fixture
def sft():
  return SequenceBuilder(CharTokenizer(), drop_text_prob=0.3, loss_on_prompt=False)


# ------------------------------------------------------------------------------------------------
# Sequences
# ------------------------------------------------------------------------------------------------

def test_text_to_image_masks_the_caption(sft):
  s = sft.text_to_image("a 7", px())
  want = enc("a 7") + block((4, 4)) + [EOS]
  assert s.tokens.tolist() == want
  n = len(enc("a 7"))
  full = expected_targets(want)
  # No CE predicts caption tokens; the last caption position predicts <|image_area|>, the response's
  # first token, and everything after is as in pre-training.
  assert s.targets[:n - 1].tolist() == [IGNORE] * (n - 1)
  assert s.targets[n - 1] == AREA
  assert s.targets[n - 1:].tolist() == full[n - 1:]
  assert s.fm_mask.sum() == 16 and s.targets[-2] == EOS and EOI in s.targets.tolist()
  # The same sample with loss on the prompt differs only in the caption's targets.
  base = SequenceBuilder(CharTokenizer(), loss_on_prompt=True).text_to_image("a 7", px())
  assert base.targets.tolist() == full
  np.testing.assert_array_equal(base.fm_mask, s.fm_mask)
  np.testing.assert_array_equal(base.image_index, s.image_index)


def test_edit_masks_sources_and_instruction(sft):
  src, tgt = px(value=10), px(value=200)
  s = sft.edit([src], "flip it", tgt)
  prompt = block((4, 4)) + enc("flip it")
  want = prompt + block((4, 4)) + [EOS]
  assert s.tokens.tolist() == want
  assert s.targets[:len(prompt) - 1].tolist() == [IGNORE] * (len(prompt) - 1)
  assert s.targets[len(prompt) - 1] == AREA
  assert s.targets[len(prompt) - 1:].tolist() == expected_targets(want)[len(prompt) - 1:]
  # Flow matching on the target image only (its 16 positions after the second BOI).
  fm = np.flatnonzero(s.fm_mask)
  assert fm.size == 16 and fm[0] > len(prompt)
  # Two sources: both blocks are prompt.
  s2 = sft.edit([src, src], "x", tgt)
  n2 = 2 * len(block((4, 4))) + 1
  assert s2.targets[:n2 - 1].tolist() == [IGNORE] * (n2 - 1) and s2.targets[n2 - 1] == AREA


def test_samples_without_a_prompt_keep_every_loss(sft):
  base = SequenceBuilder(CharTokenizer())
  flipped = sft.text_to_image("a 7", px(), flip=True)   # unconditional image, then captioning
  assert flipped.targets.tolist() == base.text_to_image("a 7", px(), flip=True).targets.tolist()
  inter = sft.interleaved(["one", px(), "two", px()])
  assert inter.targets.tolist() == base.interleaved(["one", px(), "two", px()]).targets.tolist()
  assert inter.fm_mask.sum() == 32
  chunks = sft.text_chunks("some text", 64)
  assert chunks[0].targets.tolist() == base.text_chunks("some text", 64)[0].targets.tolist()


def test_from_record_honours_the_flag():
  rng = np.random.default_rng(0)
  sft = SequenceBuilder(CharTokenizer(), 0.0, loss_on_prompt=False)
  [s] = sft.from_record({"kind": "pair", "caption": "digit 3"}, [px()], rng, 128)
  assert s.targets[:len(enc("digit 3")) - 1].tolist() == [IGNORE] * (len(enc("digit 3")) - 1)
  [e] = sft.from_record({"kind": "edit", "instruction": "invert"}, [px(), px()], rng, 128)
  assert np.all(e.targets[:len(block((4, 4))) + len(enc("invert")) - 1] == IGNORE)


# ------------------------------------------------------------------------------------------------
# The mixture reads data.loss_on_prompt
# ------------------------------------------------------------------------------------------------

def _data_config(workdir, **data):
  from tests.test_mixture import demo_config
  return demo_config(workdir, ratios=dict(text=0.0, pair=0.9, edit=0.1, interleaved=0.0), **data)


def test_mixture_and_heldout_batches_mask_prompts(tmp_path):
  tok = T.tokenizer_from_config(_data_config(tmp_path))
  assert settings_lib.data_settings(_data_config(tmp_path)).loss_on_prompt is True
  cfg = _data_config(tmp_path, loss_on_prompt=False, drop_text_prob=0.0)
  assert settings_lib.data_settings(cfg).loss_on_prompt is False
  elements, *_ = M.build_sample_dataset(cfg, tok)
  n_pairs = n_edits = 0
  for k in range(40):
    for s in elements[k].samples:
      first_image = int(np.flatnonzero(s.tokens == tok.area_id)[0])
      # Everything before the first image block is prompt (the caption, or an edit's source comes first).
      assert np.all(s.targets[:max(first_image - 1, 0)] == IGNORE), s.key
      if s.key[0] == "pair":
        n_pairs += 1
        assert s.targets[first_image - 1] == tok.area_id
      else:
        n_edits += 1
        second = int(np.flatnonzero(s.tokens == tok.area_id)[1])
        assert np.all(s.targets[:second - 1] == IGNORE) and s.targets[second - 1] == tok.area_id
        assert s.fm_mask[:second].sum() == 0 and s.fm_mask.sum() == 16
  assert n_pairs > 20 and n_edits > 0
  held = M.build_eval_batches(cfg, tok, 1)
  full = M.build_eval_batches(_data_config(tmp_path, drop_text_prob=0.0), tok, 1)
  for name in ("pair", "edit"):
    masked = int(np.sum(held[name][0]["targets"] != IGNORE))
    unmasked = int(np.sum(full[name][0]["targets"] != IGNORE))
    assert masked < unmasked, name
    np.testing.assert_array_equal(held[name][0]["fm_mask"], full[name][0]["fm_mask"])


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def test_sft_configs():
  from configs import common, demo, sft, sft_demo
  from nextstep_jax.config import validate
  assert common.base_config().data.loss_on_prompt is True
  assert demo.get_config().data.loss_on_prompt is True
  c = sft.get_config()
  validate(c, num_devices=64, paths=False)
  assert c.data.loss_on_prompt is False and c.checkpoint.init_from == "runs/anneal/checkpoints"
  assert (c.optim.lr, c.optim.min_lr, c.optim.schedule, c.optim.warmup_steps, c.steps, c.data.seq_len) == (
      1e-5, 0.0, "cosine", 500, 10_000, 8192)
  assert dict(c.data.ratios) == dict(text=0.0, pair=0.9, edit=0.1, interleaved=0.0)
  d = sft_demo.get_config()
  for n in (1, 2, 8):
    validate(d, num_devices=n, paths=False)
  assert d.data.loss_on_prompt is False and d.checkpoint.init_from == "runs/demo/checkpoints"
  assert dict(d.data.ratios) == dict(text=0.0, pair=0.9, edit=0.1, interleaved=0.0)
  assert d.optim.schedule == "cosine" and d.optim.min_lr == 0.0
  assert d.optim.lr == pytest.approx(demo.get_config().optim.lr / 10)
  assert d.data.seq_len == demo.get_config().data.seq_len // 2
  with pytest.raises(AttributeError):
    d.data.loss_on_promt = True


# ------------------------------------------------------------------------------------------------
# The SFT demo config end to end: from another run's checkpoint, checkpoint, resume
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sft_demo_runs_from_a_checkpoint_and_resumes(tmp_path, capsys):
  from configs import sft_demo
  from nextstep_jax.training import loop
  from nextstep_jax.training import metrics
  from nextstep_jax.training.checkpoint import read_step
  c = sft_demo.get_config()
  with c.unlocked():
    shrink(c)
    base, _ = make_base_run(str(tmp_path / "base"), c)
    point_at(c, base)
    c.steps, c.log_every, c.eval_every, c.optim.warmup_steps = 2, 1, 100, 1
    c.checkpoint.every = 1
    c.data.batch_size = 8
    c.sample_prompts = ()
    c.eval_batches = 1
  work = str(tmp_path / "sft")
  loop.train(c, work)
  assert "initialised params from" in capsys.readouterr().out
  with c.unlocked():
    c.steps = 3
  last = loop.train(c, work)
  assert "resumed from step 2" in capsys.readouterr().out
  assert np.isfinite(last["loss"]) and last["image_tokens"] > 0
  steps = [r["step"] for r in metrics.read_jsonl(os.path.join(work, "metrics.jsonl")) if "loss" in r]
  assert steps == [1, 2, 3]
  step, state, data_state = read_step(os.path.join(work, "checkpoints"))
  assert step == 3 and int(state["step"]) == 3 and data_state is not None
  with open(os.path.join(work, "checkpoints", "config.json")) as f:
    assert json.load(f)["data"]["loss_on_prompt"] is False
