"""One attention function with several implementations, all honouring causality and segment ids.

``xla``: the reference einsum/softmax path (any platform, used on CPU). Materialises the (Lq, Lk) logits.
``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs, bf16/fp16): cuDNN flash
  attention; causality is the kernel's own (non-causal blocks skipped), segments enter as a mask.
``splash``: Pallas splash attention (TPU): a block-sparse flash kernel with a causal mask and segment ids;
  never materialises the logits. Runs in Pallas interpret mode off TPU (slow; for tests). Under a mesh
  context (``jax.set_mesh``) it runs inside ``shard_map``: rows over the mesh axes ``data`` and ``fsdp``,
  heads over ``tensor`` (the default logical rules), since XLA cannot partition a Pallas kernel itself.
``jax``: ``jax.nn.dot_product_attention`` letting JAX pick (XLA on CPU): used to check the mask plumbing.
``auto``: ``splash`` on TPU, ``cudnn`` on GPU, ``xla`` elsewhere (by ``jax.default_backend()``; an AOT compile
  for another platform names the implementation explicitly).

Masking is by slot index, not by RoPE position: query slot i sees key slot j when j <= i, the key slot is
valid (segment id != 0), and, with the document mask, both slots belong to the same segment. Rows that see
no key at all (padding queries) get a uniform distribution over masked keys instead of NaN; their outputs
are never used. The fused kernels (``cudnn``, ``splash``) assume query slot i is key slot i when Lq == Lk
(a training forward or a prefill from slot 0); otherwise (a KV-cached step) they fall back to ``xla``.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "jax", "auto")

# Mesh axes the splash kernel's shard_map splits rows (batch) and heads over, in this order.
SPLASH_BATCH_AXES = ("data", "fsdp")
SPLASH_HEAD_AXES = ("tensor",)
_SPLASH_LANE = 128  # the kernel's sequence tile granularity: lengths are padded to a multiple of it


def resolve_implementation(implementation: str, backend: str | None = None) -> str:
  """The concrete implementation for ``auto`` on `backend` (default: jax.default_backend())."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(backend, "xla")


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


# ------------------------------------------------------------------------------------------------
# Splash (Pallas, TPU)
# ------------------------------------------------------------------------------------------------
def _splash_block(length: int) -> int:
  """Largest of 512/256/128 dividing `length` (a multiple of 128)."""
  for b in (512, 256, 128):
    if length % b == 0:
      return b
  raise ValueError(f"splash attention length {length} is not a multiple of {_SPLASH_LANE}")


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, num_heads: int, interpret: bool):
  """A causal splash-MHA kernel for one row: q (H, L, hd), k/v (K, L, hd), H a multiple of K (GQA)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as sk, splash_attention_mask as sm)
  blk = _splash_block(length)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(num_heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, q_seg, kv_seg, *, interpret: bool):
  """Splash on local shards. q (B, L, H, hd), k/v (B, L, K, hd), segments (B, L) int32 -> (B, L, H, hd)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as sk)
  kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
  to_hld = lambda x: jnp.swapaxes(x, 1, 2)  # (B, L, H, hd) -> (B, H, L, hd)
  one_row = lambda qq, kk, vv, qs, ks: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(q=qs, kv=ks))
  out = jax.vmap(one_row)(to_hld(q), to_hld(k), to_hld(v), q_seg, kv_seg)  # (B, H, L, hd)
  return jnp.swapaxes(out, 1, 2)


def _mesh_axes_dividing(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...]:
  """The axes of `names` present in `mesh` (size > 1) whose running product divides `size`."""
  chosen, prod = [], 1
  for name in names:
    n = dict(mesh.shape).get(name, 1)
    if n > 1 and size % (prod * n) == 0:
      chosen.append(name)
      prod *= n
  return tuple(chosen)


def _splash_attention(q, k, v, q_segments, kv_segments, document_mask: bool, scale: float):
  b, l, h, hd = q.shape
  kh = k.shape[2]
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel does not scale the logits
  if document_mask:
    q_seg, kv_seg = q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32)
  else:
    # Every valid query (id 1) sees every valid key (id 1); padding (id 0) only padding.
    q_seg, kv_seg = (q_segments != 0).astype(jnp.int32), (kv_segments != 0).astype(jnp.int32)
  pad = -l % _SPLASH_LANE
  if pad:  # padded slots are segment 0: valid queries never see them
    pad_l = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    q, k, v, q_seg, kv_seg = map(pad_l, (q, k, v, q_seg, kv_seg))
  interpret = jax.default_backend() != "tpu"
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty and mesh.size > 1:
    from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
    batch_axes = _mesh_axes_dividing(mesh, SPLASH_BATCH_AXES, b)
    head_axes = tuple(a for a in _mesh_axes_dividing(mesh, SPLASH_HEAD_AXES, kh)
                      if h % dict(mesh.shape)[a] == 0)
    bspec = batch_axes or None
    hspec = head_axes or None
    qkv_spec = P(bspec, None, hspec, None)
    seg_spec = P(bspec, None)
    local = jax.shard_map(local, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                          out_specs=qkv_spec, check_vma=False)
  elif jax.device_count() > 1:
    logging.warning("splash attention traced without a mesh context (jax.set_mesh): if this computation "
                    "spans several devices, XLA replicates the kernel's inputs on each of them")
  out = local(q, k, v, q_seg, kv_seg)
  return out[:, :l] if pad else out


# ------------------------------------------------------------------------------------------------
# The function
# ------------------------------------------------------------------------------------------------
def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array, q_segments: jax.Array,
              kv_segments: jax.Array, document_mask: bool = True, implementation: str = "xla") -> jax.Array:
  """Causal (segment-aware) grouped-query attention.

  q: (B, Lq, H, hd); k, v: (B, Lk, K, hd); q_slots, q_segments: (B, Lq); kv_segments: (B, Lk).
  Returns (B, Lq, H, hd).
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} not divisible by kv heads {k.shape[2]}")
  implementation = resolve_implementation(implementation)
  scale = q.shape[-1] ** -0.5
  self_attention = q.shape[1] == k.shape[1]  # training forward / prefill from slot 0: slot i is key i
  if implementation == "splash" and self_attention:
    return _splash_attention(q, k, v, q_segments, kv_segments, document_mask, scale)
  mask = make_mask(q_slots, q_segments, kv_segments, document_mask)
  if implementation in ("xla", "splash"):
    return _xla_attention(q, k, v, mask, scale)
  # jax.nn.dot_product_attention repeats the kv heads itself (GQA) and takes a (B, 1, Lq, Lk) mask.
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=self_attention,
                                        implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=None)

