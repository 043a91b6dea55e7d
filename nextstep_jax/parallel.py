"""Devices, mesh and sharding: multi-host start-up, the (data, fsdp, tensor) mesh, logical axes.

Parameters carry logical axis names as nnx Variable metadata (``nnx.Param(w, axes=("embed",
"mlp"))``). A rules table (``config.mesh.rules``) maps each logical name to a mesh axis, a tuple
of mesh axes, or None (replicated). ``logical_to_spec`` turns one tuple of logical names into a
PartitionSpec; ``shardings_for`` does it for a whole abstract state. FSDP versus tensor
parallelism is a change of ``config.mesh.axes`` and the rules, never of model code.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (str), several mesh axes (tuple), or None (replicated).
# Logical names not listed map to None.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("layers", None),
  ("norm", None),
  # The flow-matching head's two widths, sharded like embed / mlp of the backbone.
  ("fm_embed", "fsdp"),
  ("fm_mlp", "tensor"),
)

_ENV_SWITCH = "NEXTSTEP_DISTRIBUTED"
_initialized_here = False


# ------------------------------------------------------------------------------------------
# Multi-host start-up
# ------------------------------------------------------------------------------------------


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """Names the multi-process launcher visible in `env` (os.environ by default), or None.

  "forced": NEXTSTEP_DISTRIBUTED=1 (let jax auto-detect: Cloud TPU VMs without TPU env vars,
  or any cluster jax knows); NEXTSTEP_DISTRIBUTED=0 disables detection. "env":
  JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES, JAX_PROCESS_ID). "slurm": an srun step with
  more than one task. "ompi": mpirun with more than one rank. "tpu": a multi-host TPU slice
  (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES list several hosts) or a multislice job
  (MEGASCALE_COORDINATOR_ADDRESS).
  """
  env = os.environ if env is None else env
  switch = env.get(_ENV_SWITCH, "").strip().lower()
  if switch in ("0", "false", "no", "off"):
    return None
  if switch in ("1", "true", "yes", "on"):
    return "forced"
  if switch:
    raise ValueError(f"{_ENV_SWITCH}={env[_ENV_SWITCH]!r}: expected 0/1 (or unset)")
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "env"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
  if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "tpu"
  return None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Calls jax.distributed.initialize() once when a multi-process launcher is detected.

  Must run before anything touches a jax backend (device lists, arrays). Idempotent: a second
  call, or a call after someone else initialised, does nothing. Returns True when jax runs
  distributed (initialised now or before), False for a single process.
  """
  global _initialized_here
  if _initialized_here or jax.distributed.is_initialized():
    return True
  env = os.environ if env is None else env
  kind = detect_cluster(env)
  if kind is None:
    return False
  kwargs: dict[str, Any] = {}
  if kind == "env":
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not: set all three "
                       "(or NEXTSTEP_DISTRIBUTED=0 for a single process)")
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  if env.get("NEXTSTEP_HEARTBEAT_TIMEOUT_S"):
    kwargs["heartbeat_timeout_seconds"] = int(env["NEXTSTEP_HEARTBEAT_TIMEOUT_S"])
  logging.info("jax.distributed.initialize (launcher: %s)", kind)
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    raise RuntimeError(f"jax.distributed.initialize failed (launcher: {kind}); it must be "
                       f"called before any jax computation or device query: {e}") from e
  _initialized_here = True
  return True


# ------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------


def resolve_mesh_axes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Sizes of ('data', 'fsdp', 'tensor') for `num_devices`, with one -1 filling the rest.

  Missing axes count as 1. Raises ValueError naming ``mesh.axes`` for unknown axes, sizes
  that are not positive, several -1, or a product that does not match the device count.
  """
  axes = dict(axes)
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.axes has unknown axes {unknown}; the mesh axes are {MESH_AXES}")
  sizes = {name: int(axes.get(name, 1)) for name in MESH_AXES}
  bad = {k: v for k, v in sizes.items() if v != -1 and v < 1}
  if bad:
    raise ValueError(f"mesh.axes sizes must be >= 1 or -1 (fill), got {bad}")
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh.axes may have at most one -1 (fill) axis, got {fill} in {sizes}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"mesh.axes {sizes}: the fixed axes' product {fixed} does not divide "
                       f"the {num_devices} devices")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh.axes {sizes} has product {fixed}, but there are {num_devices} "
                     "devices (use -1 on one axis to fill)")
  return sizes


def check_mesh(mesh_config: Any, num_devices: int | None = None, num_granules: int | None = None
               ) -> dict[str, int] | None:
  """Checks ``config.mesh`` (axes, dcn_axes; ``rules_dict`` checks the rules) before anything is built; returns the resolved
  (data, fsdp, tensor) sizes when the device count (and, for a hybrid mesh, the granule count) allow
  it, else None after checking the structure. Raises ValueError naming the field."""
  axes = dict(mesh_config.axes)
  dcn = {k: int(v) for k, v in dict(mesh_config.dcn_axes or {}).items()}
  hybrid = any(v != 1 for v in dcn.values())
  if hybrid and num_granules is None and -1 not in dcn.values():
    num_granules = math.prod(dcn.values())  # fixed DCN sizes name the granule count themselves
  if num_devices is not None and hybrid and num_granules is not None:
    return resolve_hybrid_axes(axes, dcn, num_devices, num_granules)[2]  # axes per slice, dcn across
  if hybrid:  # structure only: the granule count (or the device count) is not known here
    probe = math.prod(abs(v) for v in dcn.values()) or 1
    resolve_hybrid_axes({k: 1 for k in MESH_AXES}, dcn, probe, probe)
    resolve_mesh_axes(axes, math.prod(abs(int(v)) for v in axes.values()) or 1)
    return None
  if num_devices is not None:
    return resolve_mesh_axes(axes, num_devices)
  resolve_mesh_axes(axes, math.prod(abs(int(v)) for v in axes.values()) or 1)  # structure only
  return {k: int(axes.get(k, 1)) for k in MESH_AXES} if -1 not in axes.values() else None


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh over `devices` (all devices by default).

  `mesh_config` is ``config.mesh`` (anything with ``.axes``) or the axes mapping itself.
  Axis types are Auto: jit with NamedShardings partitions like classic pjit, and sharding
  constraints inside the model are hints to the compiler.
  """
  axes = mesh_config.axes if hasattr(mesh_config, "axes") else mesh_config
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_axes(axes, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


# ------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# ------------------------------------------------------------------------------------------


def rules_dict(rules: Any) -> dict[str, tuple[str, ...]]:
  """Normalises a rules table (pairs or a mapping) to {logical: tuple of mesh axes}."""
  items = rules.items() if isinstance(rules, Mapping) else rules
  out: dict[str, tuple[str, ...]] = {}
  for item in items:
    if len(item) != 2:
      raise ValueError(f"mesh.rules entries must be (logical, mesh axes) pairs, got {item!r}")
    logical, target = item
    if logical in out:
      raise ValueError(f"mesh.rules names logical axis {logical!r} twice")
    if target is None:
      out[logical] = ()
    elif isinstance(target, str):
      out[logical] = (target,)
    else:
      out[logical] = tuple(target)
    for ax in out[logical]:
      if not isinstance(ax, str):
        raise ValueError(f"mesh.rules[{logical!r}] must name mesh axes, got {target!r}")
  return out


def _mesh_sizes(mesh: Mesh | Mapping[str, int] | None) -> dict[str, int] | None:
  if mesh is None:
    return None
  if isinstance(mesh, Mesh):
    return dict(mesh.shape)
  return dict(mesh)


def logical_to_spec(axes: Sequence[str | None], rules: Any,
                    shape: Sequence[int] | None = None,
                    mesh: Mesh | Mapping[str, int] | None = None) -> PartitionSpec:
  """PartitionSpec for one array whose dims carry the logical names `axes`.

  Each dim takes the mesh axes its rule names, except mesh axes an earlier dim already took
  (a spec never uses a mesh axis twice). With `shape` and `mesh` (a Mesh or {axis: size}),
  a mesh axis whose size (times those already chosen for the dim) does not divide the dim is
  skipped, so the dim falls back to fewer axes or to replication.
  """
  table = rules_dict(rules)
  sizes = _mesh_sizes(mesh)
  known = set(sizes) if sizes is not None else set(MESH_AXES)
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  entries: list[Any] = []
  for i, name in enumerate(axes):
    targets = table.get(name, ()) if name is not None else ()
    chosen: list[str] = []
    prod = 1
    for ax in targets:
      if ax not in known:
        raise ValueError(f"mesh.rules maps {name!r} to mesh axis {ax!r}, which is not one of "
                         f"{sorted(known)}")
      if ax in used:
        continue
      if shape is not None and sizes is not None and shape[i] % (prod * sizes[ax]):
        continue
      chosen.append(ax)
      prod *= sizes[ax] if sizes is not None else 1
    used.update(chosen)
    entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*entries)


def logical_sharding(axes: Sequence[str | None], mesh: Mesh, rules: Any,
                     shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding for logical `axes` on `mesh` (e.g. for activation sharding constraints)."""
  return NamedSharding(mesh, logical_to_spec(axes, rules, shape=shape, mesh=mesh))


def path_str(path: Sequence[Any]) -> str:
  """'layers.0.attn.q_proj' from a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _value_of(leaf: Any) -> Any:
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def param_axes(state: Any) -> Any:
  """Maps an nnx.State (or any pytree) of Variables to the same tree of logical-axes tuples.

  Every leaf must be an nnx.Variable declared with ``axes=(...)`` metadata of the value's
  rank; otherwise ValueError lists the offending paths. The result has tuples where the
  Variables were; use it as the `axes` of ``shardings_for`` (tuples are pytree nodes, so map
  it together with a tree whose leaves sit at those positions).
  """
  problems: list[str] = []

  def one(path, leaf):
    p = path_str(path)
    if not _is_variable(leaf):
      problems.append(f"{p}: a {type(leaf).__name__}, not an nnx.Variable with axes metadata")
      return ()
    meta = leaf.get_metadata()
    if "axes" not in meta:
      problems.append(f"{p}: {type(leaf).__name__} has no `axes` metadata")
      return ()
    axes = tuple(meta["axes"])
    ndim = len(np.shape(_value_of(leaf)))
    if len(axes) != ndim:
      problems.append(f"{p}: axes {axes} do not match the value's rank {ndim}")
    return axes

  out = jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)
  if problems:
    raise ValueError("parameters without valid logical axes:\n  " + "\n  ".join(problems))
  return out


def shardings_for(abstract: Any, mesh: Mesh, rules: Any, axes: Any = None) -> Any:
  """NamedShardings for every leaf of `abstract`, from logical axes and the rules table.

  `abstract` is a pytree whose leaves are jax.ShapeDtypeStruct (or arrays), or nnx.Variables
  holding them; `axes` is the parallel tree of logical-axes tuples (default:
  ``param_axes(abstract)``, which reads the Variables' metadata). The result has a
  NamedSharding where each leaf (or Variable) was: usable as jit in/out_shardings for the
  state and as the shardings of restore/eval_shape targets.
  """
  if axes is None:
    axes = param_axes(abstract)

  def is_leaf(x):
    return _is_variable(x) or isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray))

  def one(path, leaf, leaf_axes):
    shape = np.shape(_value_of(leaf))
    if not isinstance(leaf_axes, tuple) or len(leaf_axes) != len(shape):
      raise ValueError(f"{path_str(path)}: logical axes {leaf_axes!r} do not match shape {shape}")
    return NamedSharding(mesh, logical_to_spec(leaf_axes, rules, shape=shape, mesh=mesh))

  return jax.tree_util.tree_map_with_path(one, abstract, axes, is_leaf=is_leaf)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """The abstract tree with each ShapeDtypeStruct carrying its sharding (a restore target)."""

  def is_leaf(x):
    return _is_variable(x) or isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray))

  def one(leaf, sharding):
    value = _value_of(leaf)
    sds = jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding)
    if _is_variable(leaf):
      return leaf.replace(sds)
    return sds

  return jax.tree.map(one, abstract, shardings, is_leaf=is_leaf)


def shardings_like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that holds copies of the parameters, e.g. an optax state.

  A leaf of `tree` whose key path ends with a parameter's key path and has that parameter's
  shape gets the parameter's sharding (Adam's mu/nu follow the params); every other leaf
  (step counts, scalars) is replicated. `params` is the abstract parameter tree and
  `param_shardings` its shardings (as from ``shardings_for``).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  is_sharding = lambda x: isinstance(x, NamedSharding)
  # Expand shardings given per Variable to every array leaf under it.
  full = jax.tree.map(lambda sh, sub: jax.tree.map(lambda _: sh, sub), param_shardings, params,
                      is_leaf=is_sharding)
  by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree.leaves(full, is_leaf=is_sharding)):
    by_path[tuple(path)] = (tuple(np.shape(leaf)), sh)
  longest = max((len(p) for p in by_path), default=0)

  def one(path, leaf):
    shape = tuple(np.shape(leaf))
    for n in range(min(len(path), longest), 0, -1):
      hit = by_path.get(tuple(path[-n:]))
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


# ------------------------------------------------------------------------------------------
# Activation sharding
# ------------------------------------------------------------------------------------------

_ACTIVATION_RULES: list[Any] = [DEFAULT_RULES]


class activation_rules:  # pylint: disable=invalid-name
  """Context manager: the rules table ``constrain`` uses while tracing (default DEFAULT_RULES)."""

  def __init__(self, rules: Any):
    self.rules = rules

  def __enter__(self):
    _ACTIVATION_RULES.append(self.rules)
    return self

  def __exit__(self, *exc):
    _ACTIVATION_RULES.pop()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical axes (e.g. ("batch", "length", "embed")) under the
  context mesh (``jax.set_mesh``); a no-op without one. Keeps GSPMD from replicating the batch
  after gathers and scatters (the FM head's slot gather) or sharding it like the FSDP weights."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  spec = logical_to_spec(axes, _ACTIVATION_RULES[-1], shape=x.shape, mesh=dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


# ------------------------------------------------------------------------------------------
# Batch
# ------------------------------------------------------------------------------------------


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of every batch array: leading (row) dim over ('data', 'fsdp'), rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global jax.Arrays from this process's rows (B_local = B / process_count of each array)."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ------------------------------------------------------------------------------------------------
# Hybrid (ICI x DCN) device meshes: several TPU slices, or several GPU nodes, as one (data, fsdp, tensor) mesh.
#
# Within a *granule* (a TPU slice joined by ICI, or one process / node joined by NVLink) devices talk fast;
# between granules (data-centre network, DCN) they talk slowly, so only the cheap collectives (the data
# axis' gradient all-reduce, perhaps an outer FSDP level) should cross it. The config says how:
#
#   config.mesh.axes      per-granule (ICI) sizes of ('data', 'fsdp', 'tensor'); one -1 fills the devices of a
#                         granule. Without dcn_axes (or with all 1) this is the whole mesh, as before.
#   config.mesh.dcn_axes  sizes across granules, same axis names; one -1 fills the granule count; their
#                         product must equal the number of granules (slices or processes).
#
# Mesh axis i then has size ``axes[i] * dcn_axes[i]``, and ``jax.experimental.mesh_utils.
# create_hybrid_device_mesh`` lays the devices out so that the DCN factor of each axis is its outer (slow)
# part. Example, two v5p-64 slices (32 chips each), data-parallel across slices and FSDP inside:
# ``mesh.axes = dict(data=1, fsdp=-1, tensor=1)``, ``mesh.dcn_axes = dict(data=2, fsdp=1, tensor=1)`` gives a
# (2, 32, 1) mesh whose ``data`` axis crosses DCN.
# ------------------------------------------------------------------------------------------------

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
    ici = resolve_mesh_axes(axes, num_devices)
    ones = {k: 1 for k in MESH_AXES}
    return ici, ones, dict(ici)
  if num_devices % num_granules:
    raise ValueError(f"{num_devices} devices do not split evenly into {num_granules} granules "
                     "(slices or processes)")
  try:
    dcn_sizes = resolve_mesh_axes(dcn, num_granules)
  except ValueError as e:
    raise ValueError(f"mesh.dcn_axes {dcn} against {num_granules} granules (slices or processes): "
                     f"{str(e).replace('mesh.axes', 'mesh.dcn_axes')}") from e
  try:
    ici = resolve_mesh_axes(axes, num_devices // num_granules)
  except ValueError as e:
    raise ValueError(f"mesh.axes {dict(axes)} is per granule with mesh.dcn_axes set: it must cover the "
                     f"{num_devices // num_granules} devices of one granule: {e}") from e
  total = {k: ici[k] * dcn_sizes[k] for k in MESH_AXES}
  return ici, dcn_sizes, total


def make_hybrid_mesh(mesh_config: Any, devices: Sequence[Any] | None = None, *,
                     process_is_granule: bool | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh from ``config.mesh`` (``axes`` and optional ``dcn_axes``).

  Without DCN axes this is ``make_mesh``. With them, the devices are grouped into granules
  (TPU slices by ``slice_index``, else processes) and laid out by ``create_hybrid_device_mesh``.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = _axes_of(mesh_config, "axes")
  if axes is None:
    raise ValueError("mesh config has no `axes`")
  dcn = _axes_of(mesh_config, "dcn_axes")
  if not dcn or all(v == 1 for v in dcn.values()):
    return make_mesh(axes, devices=devices)
  key = granule_key(devices, process_is_granule)
  counts = count_granules(devices, key)
  if len(set(counts.values())) != 1:
    raise ValueError(f"granules ({key}) hold different device counts {counts}: a hybrid mesh needs equal ones")
  ici, dcn_sizes, _ = resolve_hybrid_axes(axes, dcn, len(devices), len(counts))
  ici_shape = [ici[k] for k in MESH_AXES]
  dcn_shape = [dcn_sizes[k] for k in MESH_AXES]
  if len(counts) == 1:
    # One granule: nothing crosses DCN (dcn_shape is all ones after resolution).
    return make_mesh(ici, devices=devices)
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
