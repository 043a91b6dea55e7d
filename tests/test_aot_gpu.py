"""Compiling the real train step for one 8 x H200 node from this (CPU) host with the CUDA PJRT plugin
(nextstep_jax/training/aot_gpu.py). Skipped without the plugin and cuDNN."""

import pytest

from configs.common import base_config
from nextstep_jax.training import aot, aot_gpu


def test_gpu_specs():
  assert aot_gpu.node_name("h200") == "8xH200" and aot_gpu.node_name("H100", 4) == "4xH100"
  assert aot_gpu.gpu_spec("h100").hbm_bytes < 80 * aot.GiB < aot_gpu.gpu_spec("h200").hbm_bytes
  for spec in aot_gpu.GPUS.values():
    assert "core_count: 132" in spec.target_config and f'"{spec.name}"' in spec.target_config
  with pytest.raises(ValueError, match="unknown GPU kind"):
    aot_gpu.gpu_spec("a100")


def _missing() -> str:
  if not aot_gpu.cuda_plugin_available():
    return ('needs the CUDA PJRT plugin (pip install "jax-cuda12-plugin==<jax version>", no GPU needed) to '
            "describe GPUs on this host")
  if not aot_gpu.cudnn_available():
    return "needs cuDNN (pip install nvidia-cudnn-cu12) to lower cuDNN attention"
  return ""


_MISSING = _missing()


@pytest.mark.skipif(bool(_MISSING), reason=_MISSING)
@pytest.mark.aot
@pytest.mark.slow
def test_compile_tiny_config_for_an_h200_node():
  devices = aot_gpu.gpu_node_devices("h200", 8)
  assert len(devices) == 8 and {d.device_kind for d in devices} == {"NVIDIA H200 141GB HBM3e"}
  c = base_config("tiny", "tiny")
  c.model.update(vocab_size=1024, hidden_size=256, num_heads=2, num_kv_heads=1, head_dim=128,
                 intermediate_size=512, num_layers=2, dtype="bfloat16", remat="full", attention="auto")
  c.head.update(dim=128, num_layers=2)
  c.data.seq_len = 256
  c.data.max_row_image_tokens = 256
  c.data.source = "digits"
  c.mesh.axes.update(data=1, fsdp=-1, tensor=1)
  r = aot_gpu.compile_for_node(c, "h200", 8, rows_per_device=1)
  assert r.fits and r.verdict().startswith("fits"), aot.format_result(r)
  assert r.topology == "8xH200" and r.mesh == "data=1 fsdp=8 tensor=1" and r.attention == "cudnn"
  assert r.batch_size == 8 and r.hbm_bytes == aot_gpu.gpu_spec("h200").hbm_bytes
  assert r.total_bytes is not None and 0 < r.total_bytes < r.hbm_bytes
  assert r.argument_bytes > 0
