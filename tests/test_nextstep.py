"""The unified model's loss pieces (SPEC §2, §5)."""

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from nextstep_jax.batch import IGNORE
from nextstep_jax.models import backbone as bb
from nextstep_jax.models import fm_head
from nextstep_jax.models import nextstep as ns
from tests.tolerance import assert_close_fp32

BB = bb.BackboneConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       intermediate_size=64, rope_theta=10000.0)
CFG = ns.NextStepConfig(backbone=BB, head=fm_head.HeadConfig(dim=24, num_layers=2, cond_dim=32, token_dim=8),
                        token_dim=8)


def _model(seed=0):
  m = ns.NextStep(CFG, rngs=nnx.Rngs(seed))
  # Non-zero head outputs so the FM loss depends on the condition.
  st = nnx.state(m.head, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(9), 64))
  nnx.update(m.head, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), st))
  return m


def _batch():
  """One row: text(3) BOI img img img img EOI text(1) pad(2); images: 4 tokens, all with FM loss."""
  m, d = 6, 8
  tokens = np.array([[5, 6, 7, 2, 4, 4, 4, 4, 3, 8, 0, 0, 0]], np.int32)
  index = np.array([[-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, -1]], np.int32)
  targets = np.array([[6, 7, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 3, 8, 1, IGNORE, IGNORE, IGNORE]], np.int32)
  seg = np.array([[1] * 10 + [0] * 3], np.int32)
  pos = np.array([list(range(10)) + [0] * 3], np.int32)
  fm = (index >= 0).astype(np.float32)
  img = np.random.default_rng(0).normal(size=(1, m, d)).astype(np.float32) * 3 + 1
  batch = dict(tokens=tokens, targets=targets, segment_ids=seg, positions=pos, image_index=index, fm_mask=fm)
  return {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(img)


def test_token_norm_gives_zero_mean_unit_variance():
  x = jax.random.normal(jax.random.key(0), (5, 7, 64)) * 4 + 3
  y = ns.normalize_tokens(x)
  np.testing.assert_allclose(np.mean(y, -1), 0, atol=1e-5)
  np.testing.assert_allclose(np.var(y, -1), 1, atol=1e-4)


def test_ce_ignores_masked_positions():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
  targets = jnp.asarray([[1, IGNORE, 3, IGNORE, 4], [IGNORE] * 4 + [7]])
  s, n = ns.cross_entropy(logits, targets)
  lp = jax.nn.log_softmax(logits)
  manual = -(lp[0, 0, 1] + lp[0, 2, 3] + lp[0, 4, 4] + lp[1, 4, 7])
  np.testing.assert_allclose(s, manual, rtol=1e-6)
  assert float(n) == 4
  s2, _ = ns.cross_entropy(logits.at[0, 1].add(100.0).at[1, :4].set(-5.0), targets)
  np.testing.assert_allclose(s2, s, rtol=1e-6)


def test_fm_inputs_follow_rectified_flow_with_logit_normal_t():
  x1 = jax.random.normal(jax.random.key(1), (20000, 4)) + 5
  x_t, t, v = ns.sample_fm_inputs(jax.random.key(2), x1)
  # v = x1 - x0 and x_t = t x1 + (1 - t) x0  =>  x0 = x1 - v and x_t + (1 - t) v = x1.
  x0 = x1 - v
  assert_close_fp32(x_t, t[:, None] * x1 + (1 - t[:, None]) * x0, rtol=1e-6)
  assert abs(float(jnp.mean(x0))) < 0.02 and abs(float(jnp.std(x0)) - 1) < 0.02  # noise ~ N(0, I)
  u = jnp.log(t) - jnp.log1p(-t)  # logit(t) ~ N(0, 1)
  assert abs(float(jnp.mean(u))) < 0.03 and abs(float(jnp.std(u)) - 1) < 0.03
  assert float(jnp.min(t)) > 0 and float(jnp.max(t)) < 1


def _manual_loss(model, batch, img, key):
  """Direct transcription of SPEC §2/§5 for a single row, position by position."""
  c = CFG
  toks = model.prepare_tokens(img)[0]
  index = np.asarray(batch["image_index"][0])
  x = model.backbone.embed(batch["tokens"])[0]
  for p in np.flatnonzero(index >= 0):
    x = x.at[p].set(model.image_in(toks[index[p]]))
  h, _ = model.backbone(x[None], batch["positions"], batch["segment_ids"])
  s, n = ns.cross_entropy(model.backbone.logits(h), batch["targets"])
  ce = s / n
  m = img.shape[1]
  slot_pos = {int(index[p]): p for p in np.flatnonzero(index >= 0)}
  conds, x1s, ws = [], [], []
  for slot in range(m):  # slot order, as the model lays out its head batch
    p = slot_pos.get(slot)
    conds.append(model.image_out(h[0, p - 1]) if p is not None else jnp.zeros(32))
    x1s.append(toks[slot])
    ws.append(float(batch["fm_mask"][0, p]) if p is not None else 0.0)
  k = c.head.batch_mul
  x1 = jnp.repeat(jnp.stack(x1s), k, 0)
  x_t, t, v = ns.sample_fm_inputs(jax.random.fold_in(key, 0), x1)  # row 0's noise
  pred = model.head(x_t, t, jnp.repeat(jnp.stack(conds), k, 0))
  w = jnp.repeat(jnp.asarray(ws), k)
  fm = jnp.sum(jnp.mean((pred - v) ** 2, -1) * w) / jnp.sum(w)
  return 0.01 * ce + fm, ce, fm


def test_loss_matches_position_by_position_reference():
  model = _model()
  batch, img = _batch()
  key = jax.random.key(3)
  total, metrics = model.loss(batch, img, key)
  ref_total, ref_ce, ref_fm = _manual_loss(model, batch, img, key)
  np.testing.assert_allclose(metrics["ce"], ref_ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["fm"], ref_fm, rtol=1e-5)
  np.testing.assert_allclose(total, ref_total, rtol=1e-5)
  assert float(metrics["image_tokens"]) == 4 and float(metrics["text_tokens"]) == 5


def test_condition_is_previous_position_and_context_images_get_no_loss():
  model = _model()
  batch, img = _batch()
  key = jax.random.key(4)
  _, base = model.loss(batch, img, key)
  # The token after the last image (EOI at 8) cannot influence any FM condition (causal, shift by one).
  _, same = model.loss({**batch, "tokens": batch["tokens"].at[0, 9].set(11)}, img, key)
  np.testing.assert_allclose(same["fm"], base["fm"], rtol=1e-6)
  # Images marked as context (fm_mask 0, e.g. an edit's source) get no FM loss; CE is unchanged.
  _, ctx = model.loss({**batch, "fm_mask": batch["fm_mask"].at[0, 4:8].set(0.0)}, img, key)
  assert float(ctx["fm"]) == 0.0 and float(ctx["image_tokens"]) == 0.0
  np.testing.assert_allclose(ctx["ce"], base["ce"], rtol=1e-6)


def test_chunked_ce_equals_full():
  import dataclasses
  batch, img = _batch()
  pad = lambda x, v: jnp.pad(x, ((0, 0), (0, 3)), constant_values=v)
  batch16 = {k: pad(v, IGNORE if k == "targets" else (-1 if k == "image_index" else 0)) for k, v in batch.items()}
  full = ns.NextStep(CFG, rngs=nnx.Rngs(0))
  chunked = ns.NextStep(dataclasses.replace(CFG, ce_chunk=4), rngs=nnx.Rngs(0))
  key = jax.random.key(0)
  a = full.loss(batch16, img, key)[1]
  b = chunked.loss(batch16, img, key)[1]
  np.testing.assert_allclose(a["ce"], b["ce"], rtol=1e-6)
