"""One attention function with several implementations, all honouring causality and segment ids.

``xla``: the reference einsum/softmax path (any platform, used on CPU).
``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs, bf16/fp16).
``jax``: ``jax.nn.dot_product_attention`` letting JAX pick (XLA on CPU): used to check the mask plumbing.

Masking is by slot index, not by RoPE position: query slot i sees key slot j when j <= i, the key slot is
valid (segment id != 0), and, with the document mask, both slots belong to the same segment. Rows that see
no key at all (padding queries) get a uniform distribution over masked keys instead of NaN; their outputs
are never used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "jax")


def make_mask(q_slots: jax.Array, q_segments: jax.Array, kv_segments: jax.Array,
              document_mask: bool) -> jax.Array:
  """Boolean (B, 1, Lq, Lk) mask. q_slots (B, Lq) are the queries' slot indices in the key axis."""
  lk = kv_segments.shape[1]
  kv_slots = jnp.arange(lk, dtype=jnp.int32)
  mask = kv_slots[None, None, :] <= q_slots[:, :, None]  # (B, Lq, Lk)
  mask &= (kv_segments != 0)[:, None, :]
  if document_mask:
    mask &= q_segments[:, :, None] == kv_segments[:, None, :]
  return mask[:, None]


def _xla_attention(q, k, v, mask, scale):
  # q (B, Lq, H, hd), k/v (B, Lk, K, hd) with H = K * G (grouped-query attention).
  b, lq, h, hd = q.shape
  kh = k.shape[2]
  g = h // kh
  qg = q.reshape(b, lq, kh, g, hd)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
  big_neg = jnp.finfo(jnp.float32).min
  logits = jnp.where(mask[:, :, None], logits, big_neg)  # mask (B, 1, 1, Lq, Lk)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, hd).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array, q_segments: jax.Array,
              kv_segments: jax.Array, document_mask: bool = True, implementation: str = "xla") -> jax.Array:
  """Causal (segment-aware) grouped-query attention.

  q: (B, Lq, H, hd); k, v: (B, Lk, K, hd); q_slots, q_segments: (B, Lq); kv_segments: (B, Lk).
  Returns (B, Lq, H, hd).
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} not divisible by kv heads {k.shape[2]}")
  scale = q.shape[-1] ** -0.5
  mask = make_mask(q_slots, q_segments, kv_segments, document_mask)
  if implementation == "xla":
    return _xla_attention(q, k, v, mask, scale)
  if implementation in ("cudnn", "jax"):
    # jax.nn.dot_product_attention repeats the kv heads itself (GQA) and takes a (B, 1, Lq, Lk) mask.
    impl = "cudnn" if implementation == "cudnn" else None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
  raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
