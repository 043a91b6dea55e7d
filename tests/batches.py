"""Hand-built packed batches following nextstep_jax/batch.py, for model and step tests."""

import numpy as np

from nextstep_jax.batch import IGNORE


def synthetic_batch(rows: int, seq_len: int, vocab: int, token_dim: int, image_tokens: int = 4,
                    max_row_tokens: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Each row: text, BOI(=2), an image of `image_tokens` tokens, EOI(=3), text, then a second short
  sample, then padding. Token 4 is the image placeholder; ids >= 5 are text."""
  rng = np.random.default_rng(seed)
  b = {k: np.zeros((rows, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
  b["targets"] = np.full((rows, seq_len), IGNORE, np.int32)
  b["image_index"] = np.full((rows, seq_len), -1, np.int32)
  b["fm_mask"] = np.zeros((rows, seq_len), np.float32)
  b["image_tokens"] = np.zeros((rows, max_row_tokens, token_dim), np.float32)
  for r in range(rows):
    n_text = int(rng.integers(2, 6))
    sample = list(rng.integers(5, vocab, n_text)) + [2] + [4] * image_tokens + [3] + [int(rng.integers(5, vocab))]
    second = list(rng.integers(5, vocab, int(rng.integers(2, 5))))
    p = 0
    for s_id, toks in ((1, sample), (2, second)):
      n = len(toks)
      b["tokens"][r, p:p + n] = toks
      b["segment_ids"][r, p:p + n] = s_id
      b["positions"][r, p:p + n] = np.arange(n)
      for i in range(n - 1):
        nxt = toks[i + 1]
        if nxt not in (2, 4):  # no CE on predicting BOI or image positions
          b["targets"][r, p + i] = nxt
      p += n
    img_start = n_text + 1
    b["image_index"][r, img_start:img_start + image_tokens] = np.arange(image_tokens)
    b["fm_mask"][r, img_start:img_start + image_tokens] = 1.0
    b["image_tokens"][r, :image_tokens] = rng.normal(size=(image_tokens, token_dim))
  return b
