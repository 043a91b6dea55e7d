"""Sample sequences follow SPEC §1 token for token (char-level stand-in tokenizer for exactness)."""

import numpy as np
import pytest

from nextstep_jax.data import tokenizer as T
from nextstep_jax.batch import IGNORE
from nextstep_jax.data.sequences import Image, SequenceBuilder

AREA, BOI, EOI, PH, EOS = 1, 2, 3, 4, 9


class CharTokenizer:
  """ids 0..8 the SPEC special tokens, 9 eos, then one id per character (ord + 10)."""
  special = {t: i for i, t in enumerate(T.SPECIAL_TOKENS)}
  pad_id, area_id, boi_id, eoi_id, placeholder_id, eos_id = 0, AREA, BOI, EOI, PH, EOS

  def encode(self, text):
    return [ord(c) + 10 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 10) for i in ids if i >= 10)


def enc(text):
  return CharTokenizer().encode(text)


def px(h=32, w=32, value=0):
  return Image(np.full((h, w, 3), value, np.uint8), (h // 8, w // 8))


def block(grid):
  return [AREA] + enc(f"{grid[0]}*{grid[1]}") + [BOI] + [PH] * (grid[0] * grid[1]) + [EOI]


def expected_targets(tokens):
  t = [IGNORE] * len(tokens)
  for i in range(len(tokens) - 1):
    if tokens[i + 1] not in (BOI, PH):
      t[i] = tokens[i + 1]
  return t


@pytest.fixture
def sb():
  return SequenceBuilder(CharTokenizer(), drop_text_prob=0.3)


def test_text_to_image_layout(sb):
  s = sb.text_to_image("a 7", px())
  want = enc("a 7") + block((4, 4)) + [EOS]
  assert s.tokens.tolist() == want
  assert s.targets.tolist() == expected_targets(want)
  start = len(enc("a 7")) + 1 + len(enc("4*4")) + 1
  assert s.image_index.tolist() == [-1] * start + list(range(16)) + [-1, -1]
  assert s.fm_mask.tolist() == [0.0] * start + [1.0] * 16 + [0.0, 0.0]
  # The position before BOI and BOI itself get no CE; the last image position predicts EOI.
  assert s.targets[start - 2] == IGNORE and s.targets[start - 1] == IGNORE
  assert s.targets[start + 15] == EOI and s.targets[start + 16] == EOS
  assert s.targets[-1] == IGNORE


def test_text_to_image_flipped(sb):
  s = sb.text_to_image("a 7", px(), flip=True)
  want = block((4, 4)) + enc("a 7") + [EOS]
  assert s.tokens.tolist() == want
  assert s.targets.tolist() == expected_targets(want)
  assert s.fm_mask.sum() == 16 and s.targets[0] == ord("4") + 10  # area text gets CE


def test_drop_text_probability(sb):
  flips = [sb.flip(np.random.default_rng([0, k])) for k in range(4000)]
  assert abs(np.mean(flips) - 0.3) < 0.03
  assert not SequenceBuilder(CharTokenizer(), 0.0).flip(np.random.default_rng(0))


def test_area_text_follows_grid(sb):
  s = sb.text_to_image("x", px(64, 32))   # unit 8 px: an 8 x 4 grid
  assert s.tokens.tolist() == enc("x") + block((8, 4)) + [EOS]
  assert s.num_image_tokens == 32 and s.image_index.max() == 31


def test_edit_loss_only_on_last_image(sb):
  s = sb.edit([px(value=1)], "invert", px(value=2))
  want = block((4, 4)) + enc("invert") + block((4, 4)) + [EOS]
  assert s.tokens.tolist() == want
  assert s.targets.tolist() == expected_targets(want)
  src = np.flatnonzero(s.tokens == PH)[:16]
  tgt = np.flatnonzero(s.tokens == PH)[16:]
  assert s.fm_mask[src].sum() == 0 and s.fm_mask[tgt].sum() == 16
  assert s.image_index[src].tolist() == list(range(16))
  assert s.image_index[tgt].tolist() == list(range(16, 32))
  assert s.fm_mask.sum() == 16


def test_interleaved_every_image_has_loss(sb):
  s = sb.interleaved(["seven, then two:", px(), px(), "done"])
  want = enc("seven, then two:") + block((4, 4)) * 2 + enc("done") + [EOS]
  assert s.tokens.tolist() == want
  assert s.targets.tolist() == expected_targets(want)
  assert s.fm_mask.sum() == 32 and s.image_index.max() == 31
  assert np.all((s.fm_mask > 0) == (s.tokens == PH))


def test_text_chunks(sb):
  text = "x" * 250
  chunks = sb.text_chunks(text, max_len=100)
  assert [c.length for c in chunks] == [100, 100, 51]
  joined = np.concatenate([c.tokens for c in chunks]).tolist()
  assert joined == enc(text) + [EOS]
  for c in chunks:
    assert c.targets.tolist() == expected_targets(c.tokens.tolist())
    assert c.num_images == 0 and c.fm_mask.sum() == 0 and np.all(c.image_index == -1)
  # A last chunk shorter than min_len (here a lone <eos>) is dropped.
  assert [c.length for c in sb.text_chunks("x" * 100, 100)] == [100]


def test_from_record_dispatch(sb):
  rng = np.random.default_rng(0)
  pair = sb.from_record(dict(kind="pair", caption="c"), [px()], rng, 128)
  assert len(pair) == 1 and pair[0].num_images == 1
  inter = sb.from_record(dict(kind="interleaved", segments=["a", 0, "b", 1]), [px(), px()], rng, 128)
  assert inter[0].tokens.tolist() == enc("a") + block((4, 4)) + enc("b") + block((4, 4)) + [EOS]
  with pytest.raises(ValueError, match="refers to image 2"):
    sb.from_record(dict(kind="interleaved", segments=[2]), [px()], rng, 128)
  with pytest.raises(ValueError, match="unknown record kind"):
    sb.from_record(dict(kind="video"), [], rng, 128)


def test_with_demo_tokenizer(tmp_path):
  tok = T.build_demo_tokenizer(str(tmp_path), 512)
  s = SequenceBuilder(tok).text_to_image("a handwritten digit 3", px())
  text = tok.decode(s.tokens.tolist())
  assert text.startswith("a handwritten digit 3<|image_area|>4*4<|begin_of_image|>")
  assert text.endswith("<|image_placeholder|><|end_of_image|>")
  assert s.tokens[-1] == tok.eos_id and (s.tokens == tok.placeholder_id).sum() == 16
