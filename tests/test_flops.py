"""Analytic step FLOPs against XLA's own count, and the MFU arithmetic."""

import jax
import jax.numpy as jnp
import pytest

from configs.common import base_config, stage_config
from nextstep_jax import parallel
from nextstep_jax.training import trainer as trainer_lib
from nextstep_jax.training import flops
from nextstep_jax.models import backbone as bb


def _one_layer_config():
  """One backbone layer and one head block: XLA's cost analysis (which counts a scan body once) then
  sees every matmul exactly once. Wide rather than long so attention is a small share."""
  c = base_config("tiny", "tiny")
  c.model.update(vocab_size=512, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                 intermediate_size=768, num_layers=1)
  c.head.update(dim=256, num_layers=1, batch_mul=4)
  c.image.latent_channels = 4
  c.data.seq_len = 64
  c.data.batch_size = 2
  c.data.max_row_image_tokens = 32
  c.data.max_image_tokens = 32
  c.data.min_image_tokens = 16
  return c


def test_step_flops_match_xla_cost_analysis():
  c = _one_layer_config()
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  t = trainer_lib.Trainer(c, mesh)
  b, seq, m, d = 2, 64, 32, int(c.image.token_dim)
  sds = jax.ShapeDtypeStruct
  batch = {k: sds((b, seq), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions", "image_index")}
  batch["fm_mask"] = sds((b, seq), jnp.float32)
  batch["image_tokens"] = sds((b, m, d), jnp.float32)
  state = parallel.with_shardings(t.abstract_state, t.state_shardings)
  cost = t.step_fn.lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"])
  ours = flops.step_flops(c)
  # XLA also counts elementwise work, norms, softmax, Adam (a few %), and the full (not causal-half)
  # attention square; the matmuls dominate.
  assert 0.9 * xla < ours < 1.05 * xla, (ours, xla)


def test_breakdown_scales_and_14b_is_6nd():
  c = stage_config("stage2")
  parts = flops.forward_flops_per_row(c)
  n_layers = bb.num_params(bb.BackboneConfig.from_config(c.model)) - 2 * c.model.vocab_size * c.model.hidden_size
  tokens = c.data.seq_len
  # Backbone matmuls: 2 FLOPs per layer weight per token (norm weights and biases are not matmuls).
  assert parts["backbone"] == pytest.approx(2 * n_layers * tokens, rel=1e-3)
  assert parts["lm_head"] == 2 * tokens * c.model.hidden_size * c.model.vocab_size
  # Causal attention at 16K: 2 * L^2 * H * hd per layer.
  assert parts["attention"] == 2 * tokens ** 2 * 40 * 128 * 48
  total = flops.step_flops(c)
  assert total == pytest.approx(3 * sum(parts.values()) * c.data.batch_size)
  # 14.8B parameters, 16K tokens per row: above 6*N*D per row (attention and the FM head add to it).
  assert total / c.data.batch_size > 6 * 14.7e9 * tokens
  # Doubling the rows doubles the FLOPs.
  c2 = c.copy_and_resolve_references()
  c2.data.batch_size = 2 * c.data.batch_size
  assert flops.step_flops(c2) == pytest.approx(2 * total)


def test_mfu_and_peaks():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v5") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(1e15, 1.0, 8, "cpu") is None
  # 459 TFLOP in 1 s on 2 v5p chips is 50% MFU.
  assert flops.mfu(459e12, 1.0, 2, "TPU v5") == pytest.approx(0.5)
  assert flops.tflops_per_device(989e12, 2.0, 1) == pytest.approx(494.5)
  with pytest.raises(ValueError, match="step_time"):
    flops.tflops_per_device(1.0, 0.0, 1)
