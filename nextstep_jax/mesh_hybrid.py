"""Hybrid (ICI x DCN) device meshes: several TPU slices, or several GPU nodes, as one (data, fsdp, tensor) mesh.

Within a *granule* (a TPU slice joined by ICI, or one process / node joined by NVLink) devices talk fast;
between granules (data-centre network, DCN) they talk slowly, so only the cheap collectives (the data
axis' gradient all-reduce, perhaps an outer FSDP level) should cross it. The config says how:

  config.mesh.axes      per-granule (ICI) sizes of ('data', 'fsdp', 'tensor'); one -1 fills the devices of a
                        granule. Without dcn_axes (or with all 1) this is the whole mesh, as before.
  config.mesh.dcn_axes  sizes across granules, same axis names; one -1 fills the granule count; their
                        product must equal the number of granules (slices or processes).

Mesh axis i then has size ``axes[i] * dcn_axes[i]``, and ``jax.experimental.mesh_utils.
create_hybrid_device_mesh`` lays the devices out so that the DCN factor of each axis is its outer (slow)
part. Example, two v5p-64 slices (32 chips each), data-parallel across slices and FSDP inside:
``mesh.axes = dict(data=1, fsdp=-1, tensor=1)``, ``mesh.dcn_axes = dict(data=2, fsdp=1, tensor=1)`` gives a
(2, 32, 1) mesh whose ``data`` axis crosses DCN.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from nextstep_jax import parallel
from nextstep_jax.parallel import MESH_AXES


def _axes_of(mesh_config: Any, key: str) -> dict[str, int] | None:
  if isinstance(mesh_config, Mapping):
    value = mesh_config.get(key)
  else:
    value = mesh_config.get(key) if hasattr(mesh_config, "get") else getattr(mesh_config, key, None)
  return None if value is None else {k: int(v) for k, v in dict(value).items()}


def granule_key(devices: Sequence[Any], process_is_granule: bool | None = None) -> str:
  """'slice_index' when the devices carry several TPU slices, else 'process_index' (one granule per process).

  `process_is_granule` forces the choice (True: processes, False: slices)."""
  if process_is_granule is True:
    return "process_index"
  if process_is_granule is False:
    return "slice_index"
  slices = {getattr(d, "slice_index", None) for d in devices}
  if None not in slices and len(slices) > 1:
    return "slice_index"
  return "process_index"


def count_granules(devices: Sequence[Any], key: str) -> dict[Any, int]:
  """Devices per granule, keyed by the granule's id."""
  counts: dict[Any, int] = collections.Counter(getattr(d, key, 0) for d in devices)
  return dict(sorted(counts.items()))


def num_granules(devices: Sequence[Any] | None = None, process_is_granule: bool | None = None) -> int:
  """How many granules (TPU slices, else processes) `devices` (default: all) span."""
  devices = list(jax.devices() if devices is None else devices)
  return len(count_granules(devices, granule_key(devices, process_is_granule)))


def resolve_hybrid_axes(axes: Mapping[str, int], dcn_axes: Mapping[str, int] | None, num_devices: int,
                        num_granules: int) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
  """(ici sizes, dcn sizes, total sizes) of ('data', 'fsdp', 'tensor').

  ``dcn_axes`` None or all ones: the ICI axes cover all `num_devices` (the single-granule mesh). Otherwise
  the DCN axes must cover `num_granules` and the ICI axes the devices of one granule. Errors name
  ``mesh.axes`` / ``mesh.dcn_axes``.
  """
  dcn = dict(dcn_axes or {})
  unknown = sorted(set(dcn) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.dcn_axes has unknown axes {unknown}; the mesh axes are {MESH_AXES}")
  if not dcn or all(int(v) == 1 for v in dcn.values()):
    ici = parallel.resolve_mesh_axes(axes, num_devices)
    ones = {k: 1 for k in MESH_AXES}
    return ici, ones, dict(ici)
  if num_devices % num_granules:
    raise ValueError(f"{num_devices} devices do not split evenly into {num_granules} granules "
                     "(slices or processes)")
  try:
    dcn_sizes = parallel.resolve_mesh_axes(dcn, num_granules)
  except ValueError as e:
    raise ValueError(f"mesh.dcn_axes {dcn} against {num_granules} granules (slices or processes): "
                     f"{str(e).replace('mesh.axes', 'mesh.dcn_axes')}") from e
  try:
    ici = parallel.resolve_mesh_axes(axes, num_devices // num_granules)
  except ValueError as e:
    raise ValueError(f"mesh.axes {dict(axes)} is per granule with mesh.dcn_axes set: it must cover the "
                     f"{num_devices // num_granules} devices of one granule: {e}") from e
  total = {k: ici[k] * dcn_sizes[k] for k in MESH_AXES}
  return ici, dcn_sizes, total


def make_hybrid_mesh(mesh_config: Any, devices: Sequence[Any] | None = None, *,
                     process_is_granule: bool | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh from ``config.mesh`` (``axes`` and optional ``dcn_axes``).

  Without DCN axes this is ``parallel.make_mesh``. With them, the devices are grouped into granules
  (TPU slices by ``slice_index``, else processes) and laid out by ``create_hybrid_device_mesh``.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = _axes_of(mesh_config, "axes")
  if axes is None:
    raise ValueError("mesh config has no `axes`")
  dcn = _axes_of(mesh_config, "dcn_axes")
  if not dcn or all(v == 1 for v in dcn.values()):
    return parallel.make_mesh(axes, devices=devices)
  key = granule_key(devices, process_is_granule)
  counts = count_granules(devices, key)
  if len(set(counts.values())) != 1:
    raise ValueError(f"granules ({key}) hold different device counts {counts}: a hybrid mesh needs equal ones")
  ici, dcn_sizes, _ = resolve_hybrid_axes(axes, dcn, len(devices), len(counts))
  ici_shape = [ici[k] for k in MESH_AXES]
  dcn_shape = [dcn_sizes[k] for k in MESH_AXES]
  if len(counts) == 1:
    # One granule: nothing crosses DCN (dcn_shape is all ones after resolution).
    return parallel.make_mesh(ici, devices=devices)
  grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                              process_is_granule=key == "process_index",
                                              allow_split_physical_axes=True)
  return Mesh(np.asarray(grid), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh, mesh_config: Any | None = None) -> str:
  """'data=2 (dcn 2) fsdp=32 tensor=1': the mesh shape, with the DCN factor where there is one."""
  dcn = (_axes_of(mesh_config, "dcn_axes") or {}) if mesh_config is not None else {}
  parts = []
  for name, size in dict(mesh.shape).items():
    d = int(dcn.get(name, 1))
    parts.append(f"{name}={size}" + (f" (dcn {d})" if d > 1 else ""))
  return " ".join(parts)
