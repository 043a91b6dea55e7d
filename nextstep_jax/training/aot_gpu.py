"""Compile the real train step for one NVIDIA GPU node (8 x H100 or 8 x H200) on this (CPU) host.

The CUDA PJRT plugin (``pip install "jax-cuda12-plugin==<jax version>" nvidia-cudnn-cu12``, no GPU or
driver needed) describes compile-only GPU devices from a ``GpuTargetConfigProto`` (the text protos
below: what XLA would otherwise read from an attached GPU) and a ``topology`` of
``<partitions>x<hosts per partition>x<devices per host>``:
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=..., topology="1x1x8")``.
The mesh, the Trainer's jitted step and its abstract inputs are then exactly those of the TPU path
(``nextstep_jax.training.aot``: ``prepare_config`` / ``compile_train_step`` are reused); XLA's GPU
compiler runs in full (SPMD partitioning, fusion, buffer assignment, PTX) and no weight is allocated.

Unlike the TPU compiler, the GPU compiler never refuses a program that is too large: the verdict compares
the memory-usage report's "Total bytes" (the buffer assignment the runtime allocates) with the chip's
memory (``compile_train_step`` does this when given ``hbm_bytes``). Three things the figure leaves out:
jax's GPU client preallocates 75% of the memory by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``; raise it,
e.g. to .95, for a program above that); the CUDA context, cuBLAS/cuDNN handles and NCCL buffers take roughly
1-2 GiB outside XLA's pool; and the cuDNN flash-attention workspace is sized when cuDNN builds its
graph on a real GPU (here it is compiled as 0 bytes).

Environment: ``JAX_PLATFORMS=cpu`` is the safe setting. With ``cuda`` requested (or JAX_PLATFORMS unset) the
plugin checks the installed CUDA libraries when jax discovers it and, without them, does not register; this
module sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (when imported before jax starts its backends) so that it
registers anyway, and jax falls back to the CPU as its default backend. The attention implementation must be
named (``cudnn``): ``auto`` resolves by ``jax.default_backend()``, the CPU here. Lowering ``cudnn`` attention
asks cuDNN for its version, so ``nvidia-cudnn-cu12`` must be importable too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any

# With "cuda" among the requested platforms (JAX_PLATFORMS unset included), the plugin checks the installed
# CUDA libraries when jax discovers it and, on a host without them, does not register: skip that check
# (compile-only use needs no CUDA runtime). Takes effect when jax has not initialised its backends yet.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # pylint: disable=wrong-import-position

from nextstep_jax import config as config_lib  # pylint: disable=wrong-import-position

from nextstep_jax import overrides as overrides_lib  # pylint: disable=wrong-import-position
from nextstep_jax.training import aot  # pylint: disable=wrong-import-position

GiB = aot.GiB


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """One NVIDIA GPU model: its XLA target description and the memory the verdict compares with."""
  kind: str
  name: str                # CUDA device name, jax's device_kind
  hbm_bytes: int           # as the CUDA driver reports it (cudaDeviceProp.totalGlobalMem)
  target_config: str       # stream_executor.GpuTargetConfigProto, text format


# Both are Hopper GH100 (sm_90a): 132 SMs of 128 FP32 lanes, 1.98 GHz boost, 50 MiB L2, 228 KiB shared memory
# per SM (227 KiB opt-in per block), 64K registers per SM. They differ in memory: H100 SXM5 80 GB HBM3 at
# 3.35 TB/s, H200 141 GB HBM3e at 4.8 TB/s (NVIDIA's H100 and H200 datasheets). The fields and values follow
# XLA's own specs (openxla/xla xla/backends/gpu/target_config/specs/h100_sxm.txtpb and h200.txtpb), cut to
# the fields the compiler reads; device_memory_size is the driver's figure (84942979072 B = 79.1 GiB and
# 151397597184 B = 141.0 GiB). dnn_version_info: the cuDNN the node runs (jax[cuda12] installs cuDNN 9.x);
# it gates which cuDNN fusions XLA emits.
_HOPPER_COMMON = """\
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  memory_bandwidth: {bandwidth}
  device_memory_size: {memory}
"""


def _target_config(name: str, memory: int, bandwidth: int) -> str:
  return ("gpu_device_info {\n" + _HOPPER_COMMON.format(memory=memory, bandwidth=bandwidth) + "}\n"
          'platform_name: "CUDA"\n'
          "dnn_version_info { major: 9 minor: 10 patch: 0 }\n"
          f'device_description_str: "{name}"\n')


_H100_BYTES, _H200_BYTES = 84942979072, 151397597184
GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", "NVIDIA H100 80GB HBM3", _H100_BYTES,
                    _target_config("NVIDIA H100 80GB HBM3", _H100_BYTES, 3352320000000)),
    "h200": GpuSpec("h200", "NVIDIA H200 141GB HBM3e", _H200_BYTES,
                    _target_config("NVIDIA H200 141GB HBM3e", _H200_BYTES, 4800000000000)),
}


def gpu_spec(kind: str) -> GpuSpec:
  key = kind.strip().lower()
  if key not in GPUS:
    raise ValueError(f"unknown GPU kind {kind!r}; known: {sorted(GPUS)}")
  return GPUS[key]


def node_name(kind: str, count: int = 8) -> str:
  """'8xH200'."""
  return f"{count}x{gpu_spec(kind).kind.upper()}"


_INSTALL_HINT = (f'pip install "jax-cuda12-plugin=={jax.__version__}" nvidia-cudnn-cu12 (no GPU needed), and '
                 "JAX_PLATFORMS=cpu so that the plugin does not look for a driver")


def _plugin_installed() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ImportError:  # no jax_plugins namespace at all
    return False


@functools.lru_cache(maxsize=None)
def _devices(kind: str, count: int) -> tuple[Any, ...]:
  spec = gpu_spec(kind)
  if not _plugin_installed():
    raise RuntimeError(f"the CUDA PJRT plugin is not installed: {_INSTALL_HINT}")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    desc = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=spec.target_config,
                                        topology=f"1x1x{count}")
  except Exception as e:  # plugin not registered (NotImplementedError) or a config it rejects
    raise RuntimeError(f"cannot describe {node_name(kind, count)} with the CUDA plugin: {e} ({_INSTALL_HINT})") \
        from e
  return tuple(desc.devices)


def gpu_node_devices(kind: str = "h200", count: int = 8) -> list[Any]:
  """Compile-only devices of one node of `count` GPUs of `kind` ("h100" | "h200"); RuntimeError (saying what
  to install) when the CUDA plugin cannot describe them."""
  if count < 1:
    raise ValueError(f"count={count} must be >= 1")
  return list(_devices(kind.strip().lower(), int(count)))


def cuda_plugin_available() -> bool:
  """True when the CUDA plugin describes an 8 x H200 node here (AOT for GPU works)."""
  try:
    gpu_node_devices("h200", 8)
    return True
  except RuntimeError:
    return False


def cudnn_available() -> bool:
  """True when lowering cuDNN attention can ask cuDNN for its version (nvidia-cudnn-cu12 importable)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=import-outside-toplevel
    return fused_attention_stablehlo.check_cudnn_version() > 0
  except Exception:  # pylint: disable=broad-except
    return False


def prepare_config(config, devices: list[Any], *, rows_per_device: int = 0, attention: str = "cudnn"):
  """``aot.prepare_config`` for GPU devices: the global batch as shipped (or `rows_per_device` rows per
  data-parallel device), and the attention named for the GPU (``auto`` would resolve to this host's CPU)."""
  config = aot.prepare_config(config, None, rows_per_device=rows_per_device, devices=devices)
  if attention and config.model.attention != attention:
    overrides_lib.apply_overrides(config, {"model.attention": attention})
    config_lib.validate(config, num_devices=len(devices), paths=False)
  return config


def compile_for_node(config, kind: str = "h200", count: int = 8, *, rows_per_device: int = 0,
                     attention: str = "cudnn", dump_dir: str | None = None) -> aot.AotResult:
  """Compiles ``Trainer(config, mesh).step_fn`` for one node of `count` GPUs of `kind`; the verdict compares the
  memory-usage report's bytes per device with the GPU's memory."""
  devices = gpu_node_devices(kind, count)
  config = prepare_config(config, devices, rows_per_device=rows_per_device, attention=attention)
  return aot.compile_train_step(config, devices, topology_name=node_name(kind, count),
                                hbm_bytes=gpu_spec(kind).hbm_bytes, dump_dir=dump_dir)
