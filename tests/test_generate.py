"""Unified generation's text against the plain language-model forward: greedy decoding through the KV-cached
steps writes the ids that the argmax of ``Backbone.forward_logits`` over the whole sequence (no cache) picks."""

import numpy as np
import jax
import jax.numpy as jnp

from nextstep_jax import sampling
from tests.test_sampling import CharTokenizer, _random_model


def _greedy_reference(model, tok, prompt: str, max_new: int) -> tuple[str, bool]:
  """generate's text with max_images=0, written out: each next id the argmax of the full forward's last
  logits (ids past the tokenizer's vocabulary never chosen); EOS ends it; BOI ends it, taking back the
  image-area text before it. Returns (text, whole): a step whose two best logits are within fp32
  reassociation of each other (1e-4 of the logits' scale) ends the text there, `whole` False, since the
  cached steps may pick either."""
  ids = list(tok.encode(prompt))
  area, boi = tok.special["<|image_area|>"], tok.special["<|begin_of_image|>"]
  out = []
  limit = min(model.config.backbone.vocab_size, tok.vocab_size)
  for _ in range(max_new):
    logits = np.asarray(model.backbone.forward_logits(jnp.asarray([ids + out])))[0, -1, :limit]
    top2 = np.sort(logits)[-2:]
    if top2[1] - top2[0] < 1e-4 * max(np.abs(logits).max(), 1.0):
      return tok.decode(out), False
    nxt = int(np.argmax(logits))
    if nxt == tok.eos_id:
      break
    if nxt == boi:
      if area in out:
        del out[len(out) - 1 - out[::-1].index(area):]
      break
    out.append(nxt)
  return tok.decode(out), True


def test_greedy_text_is_the_full_forward_argmax():
  tok = CharTokenizer()
  seen = 0
  for seed in range(3):
    model = _random_model(10 + seed)
    for prompt in ("hello", "a 7"):
      want, whole = _greedy_reference(model, tok, prompt, 12)
      segs = sampling.generate(model, tok, prompt, jax.random.key(0), max_new_tokens=12, max_images=0, bucket=8)
      got = segs[0][1] if segs else ""
      assert got == want if whole else got.startswith(want), (seed, prompt, got, want)
      seen += len(want)
  assert seen >= 12  # the models wrote text, not only EOS
