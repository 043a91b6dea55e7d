"""The unified NextStep-1 model (SPEC §2, §5): one causal backbone, an LM head for text and a
flow-matching head for continuous image tokens.

Inputs follow the batch contract (``nextstep_jax/batch.py``). At image positions the token embedding is
replaced by ``image_in_projector(token)``; the head's condition for the image token at position p is
``image_out_projector(h[p - 1])`` (the BOI position predicts token 0). The loss is
``ce_weight * CE + fm_weight * FM`` with rectified flow (t=0 noise, t=1 data), t = sigmoid(N(0, 1)), and
every (target, condition) pair repeated ``batch_mul`` times with fresh noise and t.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax import parallel
from nextstep_jax.batch import IGNORE
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import layers as L


def normalize_tokens(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Token-wise LayerNorm without affine over the last dim (SPEC §2), computed in fp32."""
  return L.layer_norm(x.astype(jnp.float32), eps=eps)


@dataclasses.dataclass(frozen=True)
class NextStepConfig:
  backbone: bb.BackboneConfig
  head: fm_head.HeadConfig
  token_dim: int
  token_norm: bool = True
  ce_weight: float = 0.01
  fm_weight: float = 1.0
  ce_chunk: int = 0  # > 0: compute the LM head and CE in sequence chunks of this size (saves the logits)

  @classmethod
  def from_config(cls, config: Any) -> "NextStepConfig":
    """From the full experiment config (fields model, head, image, loss)."""
    b = bb.BackboneConfig.from_config(config.model)
    img = config.image
    token_dim = int(img.latent_channels) * int(img.patch_size) ** 2
    h = fm_head.HeadConfig(dim=config.head.dim, num_layers=config.head.num_layers, cond_dim=b.hidden_size,
                           token_dim=token_dim, batch_mul=config.head.batch_mul, dtype=b.dtype,
                           param_dtype=b.param_dtype, remat=b.remat)
    return cls(backbone=b, head=h, token_dim=token_dim, token_norm=bool(img.token_norm),
               ce_weight=float(config.loss.ce_weight), fm_weight=float(config.loss.fm_weight),
               ce_chunk=int(config.loss.ce_chunk))


def cross_entropy(logits_blv: jax.Array, targets_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed CE over positions whose target is not IGNORE, and their count (both fp32)."""
  valid = targets_bl != IGNORE
  logz = jax.nn.logsumexp(logits_blv, axis=-1)
  tgt = jnp.take_along_axis(logits_blv, jnp.where(valid, targets_bl, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, logz - tgt, 0.0)), jnp.sum(valid).astype(jnp.float32)


def sample_fm_inputs(key: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rectified-flow training inputs for data x1 (N, d): (x_t, t, v_target); t = sigmoid(N(0,1))."""
  k_noise, k_t = jax.random.split(key)
  x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
  t = jax.nn.sigmoid(jax.random.normal(k_t, x1.shape[:1], jnp.float32))
  x_t = t[:, None] * x1 + (1.0 - t[:, None]) * x0
  return x_t, t, x1 - x0


class NextStep(nnx.Module):
  """Backbone + image projectors + flow-matching head."""

  def __init__(self, c: NextStepConfig, *, rngs: nnx.Rngs):
    self.config = c
    hid, pd = c.backbone.hidden_size, L.dtype_of(c.backbone.param_dtype)
    self.backbone = bb.Backbone(c.backbone, rngs=rngs)
    self.image_in_kernel = L.param(rngs, L.xavier_uniform(), (c.token_dim, hid), (None, "embed"), pd)
    self.image_in_bias = L.param(rngs, L.zeros_init, (hid,), ("embed",), pd)
    self.image_out_kernel = L.param(rngs, L.xavier_uniform(), (hid, hid), ("embed", "mlp"), pd)
    self.image_out_bias = L.param(rngs, L.zeros_init, (hid,), ("mlp",), pd)
    self.head = fm_head.FlowHead(c.head, rngs=rngs)

  # -- pieces shared by training and sampling --------------------------------------------------------
  def prepare_tokens(self, tokens: jax.Array) -> jax.Array:
    """Token-wise norm of image tokens (N.., d) when configured; fp32."""
    return normalize_tokens(tokens) if self.config.token_norm else tokens.astype(jnp.float32)

  def image_in(self, tokens: jax.Array) -> jax.Array:
    dt = L.dtype_of(self.config.backbone.dtype)
    return tokens.astype(dt) @ self.image_in_kernel[...].astype(dt) + self.image_in_bias[...].astype(dt)

  def image_out(self, h: jax.Array) -> jax.Array:
    dt = h.dtype
    return h @ self.image_out_kernel[...].astype(dt) + self.image_out_bias[...].astype(dt)

  def embed_inputs(self, tokens_bl: jax.Array, image_seq_bld: jax.Array | None,
                   image_mask_bl: jax.Array | None) -> jax.Array:
    """Token embeddings with in-projected image tokens at image positions. (B, L, D)."""
    x = self.backbone.embed(tokens_bl)
    if image_seq_bld is not None:
      x = jnp.where(image_mask_bl[..., None], self.image_in(image_seq_bld), x)
    return x

  # -- training ------------------------------------------------------------------------------------
  def hidden_states(self, batch: dict[str, jax.Array], image_tokens_bmd: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """The backbone's final-normed hidden states (B, L, D) of a packed batch, and the prepared
    (token-normed, fp32) image-token buffer (B, M, d) that batch['image_index'] points into."""
    tokens, index = batch["tokens"], batch["image_index"]
    m = image_tokens_bmd.shape[1]
    img_tokens = self.prepare_tokens(image_tokens_bmd)  # (B, M, d) fp32
    image_mask = index >= 0
    img_seq = jnp.take_along_axis(img_tokens, jnp.clip(index, 0, m - 1)[..., None], axis=1)  # (B, L, d)
    img_seq = parallel.constrain(img_seq, ("batch", "length", None))
    x = self.embed_inputs(tokens, img_seq, image_mask)
    h, _ = self.backbone(x, batch["positions"], batch["segment_ids"])  # (B, L, D)
    return parallel.constrain(h, ("batch", "length", "embed")), img_tokens

  def fm_errors(self, h_bld: jax.Array, img_tokens_bmd: jax.Array, batch: dict[str, jax.Array],
                key: jax.Array, row_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Flow-matching errors of every image-buffer slot: (err (B, M, k), weight (B, M)), fp32.

    err[r, s, j] is the squared velocity error of slot s of row r for its j-th (x0, t) draw (k =
    head.batch_mul), averaged over the token dims; weight[r, s] is the slot's fm_mask at its position
    (0 for unused slots). Slot s sits at position pos[s] and is conditioned on the out-projected hidden
    state one position earlier. The draws of row r come from fold_in(key, row_ids[r]) (default r), so a
    row gets the same noise whichever micro-batch it sits in.
    """
    c = self.config
    index = batch["image_index"]
    b, l = index.shape
    m = img_tokens_bmd.shape[1]
    image_mask = index >= 0
    slot_pos = jnp.full((b, m), -1, jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, l))
    slot_pos = slot_pos.at[rows, jnp.where(image_mask, index, m)].set(
        jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)), mode="drop")
    slot_pos = parallel.constrain(slot_pos, ("batch", None))
    used = slot_pos >= 1
    cond_pos = jnp.clip(slot_pos - 1, 0, l - 1)
    h_cond = jnp.take_along_axis(h_bld, cond_pos[..., None], axis=1)  # (B, M, D)
    h_cond = parallel.constrain(h_cond, ("batch", None, "embed"))
    cond = parallel.constrain(self.image_out(h_cond), ("batch", None, "embed"))
    weight = used * jnp.take_along_axis(batch["fm_mask"].astype(jnp.float32), jnp.clip(slot_pos, 0, l - 1),
                                        axis=1)  # (B, M)
    k = c.head.batch_mul
    x1 = jnp.repeat(img_tokens_bmd, k, axis=1)  # (B, M*k, d)
    if row_ids is None:
      row_ids = jnp.arange(b)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
    x_t, t, v_target = jax.vmap(sample_fm_inputs)(row_keys, x1)
    x_t = parallel.constrain(x_t, ("batch", None, None))
    v_target = parallel.constrain(v_target, ("batch", None, None))
    t = parallel.constrain(t, ("batch", None))
    cond_rep = parallel.constrain(jnp.repeat(cond, k, axis=1), ("batch", None, "embed"))
    v_pred = self.head(x_t.reshape(b * m * k, -1), t.reshape(-1), cond_rep.reshape(b * m * k, -1))
    mse = jnp.mean(jnp.square(v_pred - v_target.reshape(b * m * k, -1)), axis=-1)  # (B*M*k,)
    return mse.reshape(b, m, k), weight

  def loss(self, batch: dict[str, jax.Array], image_tokens_bmd: jax.Array, key: jax.Array,
           row_ids: jax.Array | None = None, normalizers: tuple[jax.Array, jax.Array] | None = None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and metrics for one packed batch.

    image_tokens_bmd: the row's image-token buffer (B, M, d) (already decoded from pixels when the
    batch carried images); batch['image_index'] (B, L) points into it, -1 on text.
    The flow-matching noise of row r is drawn from ``fold_in(key, row_ids[r])`` (default: r), so a
    row gets the same noise whichever micro-batch it sits in. ``normalizers`` = (labelled text
    positions, FM-weighted image tokens) of the whole batch when this call sees one micro-batch of
    it: the returned loss is then this micro-batch's share, and the shares add up to the full loss.
    """
    c = self.config
    h, img_tokens = self.hidden_states(batch, image_tokens_bmd)
    b, l = batch["tokens"].shape

    # Text: CE on labelled positions (fp32), optionally chunked so the (B, L, V) logits never exist whole.
    targets = batch["targets"]
    if c.ce_chunk and l > c.ce_chunk and l % c.ce_chunk == 0:
      n = l // c.ce_chunk
      hc = h.reshape(b, n, c.ce_chunk, -1).swapaxes(0, 1)
      tc = targets.reshape(b, n, c.ce_chunk).swapaxes(0, 1)

      @jax.checkpoint
      def chunk(carry, xs):
        h_chunk = parallel.constrain(xs[0], ("batch", "length", "embed"))
        logits = parallel.constrain(self.backbone.logits(h_chunk), ("batch", "length", "vocab"))
        s, cnt = cross_entropy(logits, xs[1])
        return (carry[0] + s, carry[1] + cnt), None

      (ce_sum, ce_cnt), _ = jax.lax.scan(chunk, (jnp.zeros(()), jnp.zeros(())), (hc, tc))
    else:
      ce_sum, ce_cnt = cross_entropy(self.backbone.logits(h), targets)
    ce_den = ce_cnt if normalizers is None else normalizers[0]
    ce = ce_sum / jnp.maximum(ce_den, 1.0)

    # Images: the FM error of every buffer slot and draw, weighted by the slot's fm_mask.
    err, weight = self.fm_errors(h, img_tokens, batch, key, row_ids)  # (B, M, k), (B, M)
    k = c.head.batch_mul
    fm_den = k * jnp.sum(weight) if normalizers is None else normalizers[1] * k
    fm = jnp.sum(err * weight[..., None]) / jnp.maximum(fm_den, 1.0)

    total = c.ce_weight * ce + c.fm_weight * fm
    metrics = {"loss": total, "ce": ce, "fm": fm, "text_tokens": ce_cnt, "image_tokens": jnp.sum(weight)}
    return total, metrics


def build_model(config: Any, seed: int = 0) -> NextStep:
  """Materialised model from the experiment config."""
  return NextStep(NextStepConfig.from_config(config), rngs=nnx.Rngs(params=seed))
