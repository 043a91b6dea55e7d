"""The compiled sampler against the naive per-token loop, compilation counts, and unified generation."""

import dataclasses
import re

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from nextstep_jax import sampling
from nextstep_jax.batch import IGNORE
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import nextstep as ns
from tests.tolerance import assert_close_fp32

# One set of shapes for every model here: eager construction compiles each init op once per shape.
BB = bb.BackboneConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, rope_theta=10000.0)
CFG = ns.NextStepConfig(backbone=BB, head=fm_head.HeadConfig(dim=64, num_layers=2, cond_dim=64, token_dim=8),
                        token_dim=8)


def _random_model(seed=0):
  """A tiny model whose head is perturbed: its zero-initialised output layers would hide everything."""
  m = ns.NextStep(CFG, rngs=nnx.Rngs(seed))
  st = nnx.state(m.head, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
  nnx.update(m.head, jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), st))
  return m


def _prompt(rng, lengths, width, with_image=False, m=3):
  """Left-padded random prompts; with_image puts m source-image slots inside each row."""
  toks = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), bool)
  index = np.full((len(lengths), width), -1, np.int32)
  for r, n in enumerate(lengths):
    toks[r, width - n:] = rng.integers(9, BB.vocab_size, size=n)
    mask[r, width - n:] = True
    if with_image:
      index[r, width - n + 1:width - n + 1 + m] = np.arange(m)
  if not with_image:
    return sampling.Prompt(toks, mask)
  img = rng.normal(size=(len(lengths), m, CFG.token_dim)).astype(np.float32) * 2 + 0.5
  return sampling.Prompt(toks, mask, img, index)


CASES = {
    "no_guidance": dict(groups=1, cfg=7.5, sde=False, shift=1.0),
    "cfg": dict(groups=2, cfg=7.5, sde=False, shift=1.0),
    "edit": dict(groups=3, cfg=7.5, cfg_img=2.0, sde=False, shift=3.2),
    "sde_cfg": dict(groups=2, cfg=3.0, sde=True, shift=1.0),
    # The official pipeline's options: the linear guidance schedule and start noise shared across captions.
    "edit_sde_linear_shared_noise": dict(groups=3, cfg=7.5, cfg_img=2.0, sde=True, shift=3.2,
                                         cfg_schedule="linear", noise_repeat=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_sampler_equals_naive_loop(case):
  c = CASES[case]
  model = _random_model(1)
  rng = np.random.default_rng(0)
  if c["groups"] == 3:  # editing rows: [image + text, image + negative, negative only]
    prompts = [_prompt(rng, [9, 7], 10, with_image=True), _prompt(rng, [6, 8], 9, with_image=True),
               _prompt(rng, [3, 4], 5)]
  else:
    prompts = [_prompt(rng, [7, 5], 8), _prompt(rng, [4, 3], 4)][:c["groups"]]
  h, w, key = 2, 3, jax.random.key(7)
  kw = dict(cfg=c["cfg"], cfg_img=c.get("cfg_img", 2.0), steps=6, time_shift=c["shift"], sde=c["sde"],
            cfg_schedule=c.get("cfg_schedule", "constant"), noise_repeat=c.get("noise_repeat", 0))
  fast = np.asarray(sampling.sample_guided(model, prompts, h, w, key, **kw))
  slow = sampling.sample_images_naive(model, prompts, h, w, key, **kw)
  assert fast.shape == (2, h * w, CFG.token_dim)
  # Cached vs naive loop: an ODE/SDE of `steps` evaluations compounds the rounding; 5e-5 of the tokens'
  # magnitude (about 2.4, so about the former bare atol=1e-4).
  assert_close_fp32(fast, slow, rtol=5e-5)
  # use_norm: every token is layer-normed.
  np.testing.assert_allclose(fast.mean(-1), 0, atol=1e-5)
  # The rows differ (the prompt matters) and the guidance weight matters.
  assert np.abs(fast[0] - fast[1]).max() > 1e-2
  if c["groups"] > 1:
    other = np.asarray(sampling.sample_guided(model, prompts, h, w, key, **{**kw, "cfg": 1.5}))
    assert np.abs(other - fast).max() > 1e-2


def test_public_wrappers_match_sample_guided():
  # Shapes as in the cases above, so the compiled sampler is reused.
  model = _random_model(2)
  rng = np.random.default_rng(1)
  cond, neg = _prompt(rng, [5, 6], 8), _prompt(rng, [3, 3], 4)
  key, kw = jax.random.key(0), dict(steps=6)
  ref = sampling.sample_guided(model, [cond, neg], 2, 3, key, **kw)
  # Bare tokens: the mask comes from pad_id (0 never appears among the real ids drawn above).
  got = sampling.sample_images(model, cond.tokens, (neg.tokens, neg.mask), 2, 3, key, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  ed = [_prompt(rng, [5, 6], 10, with_image=True), _prompt(rng, [5, 6], 9, with_image=True),
        _prompt(rng, [2, 3], 5)]
  np.testing.assert_array_equal(
      np.asarray(sampling.edit_images(model, *ed, 2, 3, key, **kw)),
      np.asarray(sampling.sample_guided(model, ed, 2, 3, key, cfg=7.5, cfg_img=2.0, time_shift=3.2, **kw)))
  # Source image tokens given beside plain tokens.
  p = ed[0]
  np.testing.assert_array_equal(
      np.asarray(sampling.sample_images(model, (p.tokens, p.mask), None, 2, 3, key, prompt_image_tokens=p.image_tokens,
                                        prompt_image_index=p.image_index, **kw)),
      np.asarray(sampling.sample_guided(model, [p], 2, 3, key, **kw)))


def test_left_padding_does_not_change_samples():
  model = _random_model(3)
  rng = np.random.default_rng(2)
  cond, neg = _prompt(rng, [5, 3], 5), _prompt(rng, [2, 2], 2)
  more = sampling.Prompt(np.pad(cond.tokens, ((0, 0), (4, 0))), np.pad(cond.mask, ((0, 0), (4, 0))))
  key = jax.random.key(3)
  a = sampling.sample_images(model, cond, neg, 2, 2, key, steps=4)
  b = sampling.sample_images(model, more, neg, 2, 2, key, steps=4)
  assert_close_fp32(a, b, rtol=5e-5)


def test_same_bucket_prompts_do_not_recompile():
  model = _random_model(4)
  rng = np.random.default_rng(3)
  call = lambda cond, neg, key, cfg: sampling.sample_images(model, cond, neg, 2, 2, key, cfg=cfg, steps=3)
  call(_prompt(rng, [4, 6], 8), _prompt(rng, [2, 2], 4), jax.random.key(0), 7.5)
  before = sampling.trace_count()
  # Other contents, other lengths inside the same padded shapes, another seed and guidance weight.
  call(_prompt(rng, [8, 1], 8), _prompt(rng, [3, 4], 4), jax.random.key(1), 3.0)
  call(_prompt(rng, [2, 5], 8), _prompt(rng, [1, 1], 4), jax.random.key(2), 1.0)
  sampling.sample_images(_random_model(5), _prompt(rng, [3, 3], 8), _prompt(rng, [2, 2], 4), 2, 2,
                         jax.random.key(3), steps=3)  # another model with the same shapes
  assert sampling.trace_count() == before
  call(_prompt(rng, [4, 6], 16), _prompt(rng, [2, 2], 4), jax.random.key(0), 7.5)  # a new bucket
  assert sampling.trace_count() == before + 1


def test_time_grids():
  np.testing.assert_allclose(sampling.ode_grid(4, 1.0), [0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
  g = np.asarray(sampling.ode_grid(4, 3.2))
  np.testing.assert_allclose(g, [t / (3.2 - 2.2 * t) for t in (0, 0.25, 0.5, 0.75, 1.0)], rtol=1e-6)
  assert g[0] == 0 and abs(g[-1] - 1) < 1e-7 and np.all(np.diff(g) > 0) and g[2] < 0.5
  s = np.asarray(sampling.sde_grid(5, 1.0))
  np.testing.assert_allclose(s[[0, -1]], [0, 1 - sampling.SDE_LAST_STEP], atol=1e-7)


def test_sample_logits_greedy_top_p_and_vocab_limit():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9, 5.0], [4.0, 0.0, 0.0, 0.0, 0.0]])
  key = jax.random.key(0)
  greedy = sampling.sample_logits(logits, key, 0.0, 1.0, 5)
  np.testing.assert_array_equal(greedy, [4, 0])
  np.testing.assert_array_equal(sampling.sample_logits(logits, key, 0.0, 1.0, 4), [1, 0])  # id 4 is off-vocab
  draws = np.stack([sampling.sample_logits(logits, jax.random.key(i), 1.0, 0.5, 5) for i in range(50)])
  assert set(draws[:, 0]) == {4}  # the top id alone holds more than half the mass
  draws = np.stack([sampling.sample_logits(logits, jax.random.key(i), 1.0, 0.9, 4) for i in range(200)])
  assert set(draws[:, 0]) == {1, 3}  # nucleus of the top two among the first four ids
  wide = np.stack([sampling.sample_logits(logits, jax.random.key(i), 5.0, 1.0, 5) for i in range(200)])
  assert len(set(wide[:, 0])) == 5


def test_bad_prompts_are_rejected():
  model = _random_model(0)
  toks = np.array([[5, 6, 0, 0]], np.int32)  # right-padded
  with pytest.raises(ValueError, match="not left-padded"):
    sampling.sample_images(model, toks, None, 1, 1, jax.random.key(0), steps=2)
  with pytest.raises(ValueError, match="no real token"):
    sampling.sample_images(model, (toks, np.zeros_like(toks)), None, 1, 1, jax.random.key(0), steps=2)
  with pytest.raises(ValueError, match="group 1 has 2 rows"):
    sampling.sample_images(model, np.array([[5, 6]]), np.array([[5, 6], [7, 8]]), 1, 1, jax.random.key(0))
  with pytest.raises(ValueError, match="image_index points past"):
    sampling.sample_images(model, np.array([[5, 6]]), None, 1, 1, jax.random.key(0),
                           prompt_image_tokens=np.zeros((1, 1, 8)), prompt_image_index=np.array([[-1, 1]]))


# ---------------------------------------------------------------------------------------------
# Unified generation on a tiny model trained on two fixed sequences
# ---------------------------------------------------------------------------------------------

SPECIALS = ("[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>",
            "<|begin_of_prompt_refinement|>", "<|end_of_prompt_refinement|>", "<|begin_of_thinking|>",
            "<|end_of_thinking|>", "<eos>")
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789*:"


class CharTokenizer:
  """Characters plus the SPEC §1 special tokens (the interface of nextstep_jax.data.tokenizer)."""

  def __init__(self):
    self.special = {s: i for i, s in enumerate(SPECIALS)}
    self.vocab = list(SPECIALS) + list(CHARS)
    self._ids = {c: i for i, c in enumerate(self.vocab)}
    self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

  vocab_size = property(lambda self: len(self.vocab))
  pad_id = property(lambda self: 0)
  eos_id = property(lambda self: self.special["<eos>"])

  def encode(self, text):
    out = []
    for part in self._split.split(text):
      out += [self._ids[part]] if part in self.special else [self._ids[ch] for ch in part]
    return out

  def decode(self, ids):
    return "".join(self.vocab[i] for i in ids)


# batch_mul 32: many noise draws per step, so 300 steps fit the head well.
GEN_CFG = dataclasses.replace(CFG, head=dataclasses.replace(CFG.head, batch_mul=32), ce_weight=1.0)


def _gen_batch(tok, images):
  """Two rows: a plain text-image-text sample and a thinking one (the BOT belongs to the prompt)."""
  ph = tok.special["<|image_placeholder|>"]
  rows = [("hello", None, " world <|image_area|>2*2<|begin_of_image|>", " bye"),
          ("hello", "<|begin_of_thinking|>", "plan<|end_of_thinking|><|image_area|>2*2<|begin_of_image|>", " ok")]
  length = 40
  out = {k: np.zeros((2, length), np.int32) for k in ("tokens", "segment_ids", "positions")}
  out["targets"] = np.full((2, length), IGNORE, np.int32)
  out["image_index"] = np.full((2, length), -1, np.int32)
  for r, (prompt, marker, before, after) in enumerate(rows):
    ids = tok.encode(prompt) + (tok.encode(marker) if marker else []) + tok.encode(before)
    img_at = len(ids)
    ids += [ph] * 4 + [tok.special["<|end_of_image|>"]] + tok.encode(after) + [tok.eos_id]
    n = len(ids)
    out["tokens"][r, :n] = ids
    out["segment_ids"][r, :n] = 1
    out["positions"][r, :n] = np.arange(n)
    out["image_index"][r, img_at:img_at + 4] = np.arange(4)
    for p in range(n - 1):
      if not img_at - 1 <= p < img_at + 3:  # BOI and image positions (except the last) predict no text
        out["targets"][r, p] = ids[p + 1]
    if marker:
      out["targets"][r, len(tok.encode(prompt)) - 1] = IGNORE  # the forced BOT is not learned
  out["fm_mask"] = (out["image_index"] >= 0).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in out.items()}, jnp.asarray(images)


def _train_generator(tok, images, steps=300):
  model = ns.NextStep(GEN_CFG, rngs=nnx.Rngs(0))
  batch, img = _gen_batch(tok, images)
  graphdef, params = nnx.split(model)
  tx = optax.adam(optax.cosine_decay_schedule(5e-3, steps, alpha=0.05))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    def loss_fn(p):
      return nnx.merge(graphdef, p).loss(batch, img, key)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, metrics

  for i in range(steps):
    params, opt, metrics = step(params, opt, jax.random.key(i))
  return nnx.merge(graphdef, params), {k: float(v) for k, v in metrics.items()}


def test_generate_writes_text_then_image_then_text():
  tok = CharTokenizer()
  assert tok.vocab_size <= BB.vocab_size
  images = np.asarray(ns.normalize_tokens(jax.random.normal(jax.random.key(5), (2, 4, 8))))
  model, metrics = _train_generator(tok, images)
  assert metrics["ce"] < 0.05, metrics

  segs = sampling.generate(model, tok, "hello", jax.random.key(0), max_new_tokens=30, image_size=(3, 3),
                           steps=20)
  assert [s[0] for s in segs] == ["text", "image", "text"], segs
  assert segs[0][1] == " world "  # the image-area prefix belongs to the image block
  _, toks, h, w = segs[1]
  assert (h, w) == (2, 2)  # parsed from "2*2" that the model wrote, not the requested 3x3
  assert toks.shape == (4, 8)
  assert np.abs(toks - images[0]).max() < 0.5, np.abs(toks - images[0]).max()
  assert segs[2][1] == " bye"

  # Self-CoT: the model thinks, then the image prefix is forced, then it finishes the text.
  segs = sampling.generate(model, tok, "hello", jax.random.key(1), max_new_tokens=30, image_size=(2, 2),
                           think=True, steps=20)
  assert [s[0] for s in segs] == ["text", "image", "text"], segs
  assert segs[0][1] == "plan<|end_of_thinking|>" and segs[2][1] == " ok"
  assert np.abs(segs[1][1] - images[1]).max() < 0.5

  # Guidance adds a negative row for the image; the structure stays, and the text budget is honoured.
  before = sampling.trace_count("text_step")
  segs = sampling.generate(model, tok, "hello", jax.random.key(2), max_new_tokens=30, image_size=(2, 2), cfg=2.0,
                           steps=8)
  assert [s[0] for s in segs] == ["text", "image", "text"] and segs[1][1].shape == (4, 8)
  assert sampling.trace_count("text_step") == before  # same cache size: no new compilation per token
  segs = sampling.generate(model, tok, "hello", jax.random.key(0), max_new_tokens=3)
  assert segs == [("text", " wo")]


def test_image_prompts_with_the_project_tokenizer():
  from nextstep_jax.data import tokenizer as tok_lib
  tok = tok_lib.train_sentencepiece(["a 7 drawn thick, 16*16", "draw a 3 next to it", "hello world"] * 20,
                                    vocab_size=80)
  texts = ["a 7", "draw a 3 next to it"]
  cond, neg = sampling.image_prompts(tok, texts, 16, 16, bucket=8)
  assert cond.tokens.shape[1] % 8 == 0 and neg.tokens.shape[1] % 8 == 0
  for r, text in enumerate(texts):
    ids = cond.tokens[r][cond.mask[r]]
    assert ids[0] != tok.pad_id and np.all(cond.tokens[r][~cond.mask[r]] == tok.pad_id)
    assert tok.decode(ids) == text + "<|image_area|>16*16<|begin_of_image|>"
    assert ids[-1] == tok.boi_id and tok.area_id in ids
    assert tok.decode(neg.tokens[r][neg.mask[r]]) == "<|image_area|>16*16<|begin_of_image|>"
