"""Packing: rows never split samples, fixed shapes, bucket-pure pixel batches, resumable state,
and the packing efficiency of a stage2-like length distribution at 16K rows."""

import dataclasses

import numpy as np
import pytest

from nextstep_jax.batch import IGNORE, validate_batch
from nextstep_jax.data.packing import RowPacker, RowSpec, assemble_batch, fill_fraction, pack_lengths
from nextstep_jax.data.sequences import Image, SequenceBuilder
from nextstep_jax.data.sources import aspect_buckets
from tests.test_sequences import CharTokenizer


def spec(**kw):
  base = dict(seq_len=64, payload="images", max_images=3, max_image_tokens=48, token_dim=4,
              image_shape=(32, 32), pad_id=0, open_rows=4)
  base.update(kw)
  return RowSpec(**base)


def pixel_sample(sb, caption, value, key, shape=(32, 32)):
  s = sb.text_to_image(caption, Image(np.full(shape + (3,), value, np.uint8),
                                      (shape[0] // 8, shape[1] // 8)))
  s.key = key
  return s


def test_assemble_pixel_rows():
  sb = SequenceBuilder(CharTokenizer())
  a = pixel_sample(sb, "ab", 0, "a")
  b = pixel_sample(sb, "c", 255, "b")
  t = sb.text_chunks("hello", 64)[0]
  t.key = "t"
  sp = spec()
  packer = RowPacker(sp)
  for s in (a, b, t):
    packer.add(s)
  packer.flush()
  assert packer.take_batch(2) is None, "one closed row is not a batch of two"
  rows = packer.take_batch(1)
  assert rows is not None and len(rows) == 1
  batch = assemble_batch(rows, sp, batch_rows=2)   # padded with an empty row
  validate_batch(batch, 64)
  assert batch["images"].shape == (2, 3, 32, 32, 3)
  n_a, n_b, n_t = a.length, b.length, t.length
  row = rows[0]
  order = [s.key for s in row.samples]
  assert sorted(order) == ["a", "b", "t"]
  pos = 0
  tok_off = 0
  for seg, s in enumerate(row.samples, start=1):
    sl = slice(pos, pos + s.length)
    assert batch["tokens"][0, sl].tolist() == s.tokens.tolist()
    assert batch["targets"][0, sl].tolist() == s.targets.tolist()
    assert np.all(batch["segment_ids"][0, sl] == seg)
    assert batch["positions"][0, sl].tolist() == list(range(s.length))
    idx = batch["image_index"][0, sl]
    want = np.where(s.image_index >= 0, s.image_index + tok_off, -1)
    assert idx.tolist() == want.tolist()
    tok_off += s.num_image_tokens
    pos += s.length
  assert pos == n_a + n_b + n_t
  # Padding, then the empty second row.
  assert np.all(batch["tokens"][0, pos:] == 0) and np.all(batch["targets"][0, pos:] == IGNORE)
  assert np.all(batch["segment_ids"][0, pos:] == 0) and np.all(batch["image_index"][0, pos:] == -1)
  assert np.all(batch["segment_ids"][1] == 0) and batch["num_images"].tolist() == [2, 0]
  # Image n's token j sits at buffer index n * 16 + j: pixels follow the sample order.
  first_img = [s for s in row.samples if s.num_images][0]
  want_px = -1.0 if first_img.key == "a" else 1.0
  assert np.all(batch["images"][0, 0] == want_px) and np.all(batch["images"][0, 2] == 0)
  assert batch["fm_mask"][0].sum() == 32


def test_assemble_latent_rows():
  sb = SequenceBuilder(CharTokenizer())
  sp = spec(payload="image_tokens", max_image_tokens=40)
  samples = []
  for i, grid in enumerate([(4, 4), (2, 8), (4, 4)]):
    tokens = np.full((grid[0] * grid[1], 4), i + 1, np.float32)
    s = sb.interleaved(["x", Image(tokens, grid)])
    s.key = i
    samples.append(s)
  packer = RowPacker(sp)
  for s in samples:
    assert sp.reject_reason(s) is None
    packer.add(s)
  packer.flush()
  rows = []
  while (r := packer.take_batch(1)) is not None:
    rows += r
  assert all(r.num_image_tokens <= 40 for r in rows), "the flat buffer limit holds"
  assert len(rows) == 2
  batch = assemble_batch(rows, sp)
  validate_batch(batch, 64)
  assert batch["image_tokens"].shape == (2, 40, 4)
  for r, row in enumerate(rows):
    ids = batch["image_index"][r][batch["image_index"][r] >= 0]
    vals = batch["image_tokens"][r][ids][:, 0]
    want = np.concatenate([np.full(s.num_image_tokens, s.key + 1) for s in row.samples])
    assert vals.tolist() == want.tolist()
    assert batch["image_tokens"][r, len(ids):].sum() == 0


def test_reject_reasons():
  sb = SequenceBuilder(CharTokenizer())
  sp = spec(seq_len=30, max_images=1)
  assert sp.reject_reason(pixel_sample(sb, "x" * 10, 0, 0)) == "too_long"
  two = sb.interleaved([Image(np.zeros((8, 8, 3), np.uint8), (1, 1))] * 2)
  assert sp.reject_reason(two) == "too_many_images"
  lat = spec(payload="image_tokens", max_image_tokens=8)
  big = sb.interleaved([Image(np.zeros((16, 4), np.float32), (4, 4))])
  assert lat.reject_reason(big) == "too_many_image_tokens"


@dataclasses.dataclass
class Stub:
  """A length-only sample for packing studies."""
  length: int
  num_images: int = 0
  num_image_tokens: int = 0
  image_shape: tuple | None = None
  key: object = None


def test_pixel_rows_are_bucket_pure_and_samples_never_split():
  rng = np.random.default_rng(0)
  shapes = [(32, 32), (16, 64), (64, 16)]
  samples = []
  for i in range(600):
    if rng.random() < 0.2:
      samples.append(Stub(int(rng.integers(2, 64)), key=i))
    else:
      samples.append(Stub(int(rng.integers(20, 40)), 1, 16, shapes[int(rng.integers(3))], key=i))
  sp = spec(max_images=3)
  packer = RowPacker(sp)
  batches = []
  for s in samples:
    packer.add(s)
    while (rows := packer.take_batch(4)) is not None:
      batches.append(rows)
  seen = []
  for rows in batches:
    assert len(rows) == 4
    groups = {r.group for r in rows} - {None}
    assert len(groups) <= 1, "one bucket per pixel-path batch"
    for r in rows:
      assert r.length <= 64 and r.num_images <= 3
      assert len({s.image_shape for s in r.samples} - {None}) <= 1
      seen += [s.key for s in r.samples]
  assert len(seen) == len(set(seen)), "a sample sits in exactly one row"
  pending = [s.key for r in packer.open + packer.full for s in r.samples]
  assert sorted(seen + pending) == list(range(600)), "no sample lost"


def test_state_roundtrip_continues_identically():
  rng = np.random.default_rng(1)
  samples = {i: Stub(int(rng.integers(5, 60)), key=i) for i in range(400)}
  sp = spec(open_rows=6)

  def run(packer, keys):
    out = []
    for k in keys:
      packer.add(samples[k])
      while (rows := packer.take_batch(2)) is not None:
        out.append([r.keys() for r in rows])
    return out

  a = RowPacker(sp)
  run(a, range(200))
  state = a.state()
  tail_a = run(a, range(200, 400))
  b = RowPacker(sp)
  b.load_state(state, lambda key: samples[key])
  assert run(b, range(200, 400)) == tail_a


def stage2_like(n, seq_len, seed=0):
  """Lengths like stage2 data: 256..1024-token images in SPEC buckets (mixed 256/512 bases),
  captions of ~60 tokens, interleaved documents of 2..6 images, text documents chunked."""
  rng = np.random.default_rng(seed)
  buckets = aspect_buckets(16) + aspect_buckets(32)
  out = []
  while len(out) < n:
    u = rng.random()
    if u < 0.6:
      h, w = buckets[int(rng.integers(len(buckets)))]
      cap = int(np.clip(rng.lognormal(np.log(60), 0.7), 5, 400))
      out.append(Stub(cap + h * w + 8 + 1, 1, h * w, (16 * h, 16 * w)))
    elif u < 0.8:
      toks = text = 0
      k = int(rng.integers(2, 7))
      for _ in range(k):
        h, w = buckets[int(rng.integers(len(buckets)))]
        toks += h * w
        text += int(np.clip(rng.lognormal(np.log(60), 0.8), 5, 400)) + 8
      out.append(Stub(toks + text + 1, k, toks, None))
    else:
      left = int(np.clip(rng.lognormal(np.log(600), 1.3), 10, 200_000)) + 1
      while left > 0:
        out.append(Stub(min(left, seq_len)))
        left -= seq_len
  return out


def test_packing_efficiency_stage2_like_16k():
  seq_len = 16_384
  samples = stage2_like(6000, seq_len)
  sp = RowSpec(seq_len=seq_len, payload="image_tokens", max_images=seq_len // 256,
               max_image_tokens=seq_len, token_dim=64, image_shape=(512, 512), pad_id=0,
               open_rows=8)
  rows, eff = pack_lengths(samples, sp)
  print(f"stage2-like packing at {seq_len}: {len(rows)} rows, non-pad fraction {eff:.4f}")
  assert eff >= 0.95
  assert sum(r.length for r in rows) == sum(s.length for s in samples)


def test_fill_fraction():
  assert fill_fraction({"segment_ids": np.array([[1, 1, 0, 0], [2, 0, 0, 0]])}) == 3 / 8


def test_spec_validation():
  with pytest.raises(ValueError, match="data.payload"):
    spec(payload="latents")
  with pytest.raises(ValueError, match="open_rows"):
    spec(open_rows=0)


def test_padded_chunks_have_one_shape_and_cover_every_row_once():
  from nextstep_jax.batch import padded_chunks
  x = np.arange(7 * 2).reshape(7, 2)
  got = list(padded_chunks(x, 3))
  assert [real for real, _ in got] == [3, 3, 1]
  assert all(chunk.shape == (3, 2) for _, chunk in got)
  np.testing.assert_array_equal(np.concatenate([c[:r] for r, c in got]), x)
  np.testing.assert_array_equal(got[-1][1], np.repeat(x[-1:], 3, axis=0))  # padded with the last row
  assert [r for r, _ in padded_chunks(x[:2], 5)] == [2] and next(padded_chunks(x[:2], 5))[1].shape == (5, 2)
  with pytest.raises(ValueError, match="padded_chunks"):
    next(padded_chunks(x[:0], 3))
