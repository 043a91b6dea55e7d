"""Test setup: 8 virtual CPU devices for mesh tests (must be set before jax is imported), and a
faster-compiling XLA CPU backend (optimisation level 0 compiles about 3x faster; tests run tiny
models where compile time, not run time, dominates)."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
