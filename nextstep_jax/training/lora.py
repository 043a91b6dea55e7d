"""LoRA (low-rank adaptation) as a functional transform of the model's pure parameter dict.

The base parameters stay untouched; a small, separate tree of adapters ``lora_params`` holds, for each
targeted kernel W, a pair A (in-dims -> rank) and B (rank -> out-dims). The adapted model uses

    W' = W + (alpha / rank) * (A @ B)          (A @ B reshaped to W's shape)

``apply_lora(base, lora, cfg)`` builds W' with plain jnp inside the loss, so ``jax.grad`` taken with
respect to ``lora`` only trains the adapters and the base is a constant of the step. B starts at zero,
so at initialisation the adapted model *is* the base model. ``merge_lora`` produces ordinary weights
for export (``interop.names.nextstep_to_tensors``); ``save_lora`` / ``load_lora`` store the adapters
alone (a safetensors file and a json config, no pickle).

Layout: the adapter tree mirrors the base tree down to the kernel, then holds ``lora_a`` / ``lora_b``:
``lora["backbone"]["layers"]["q_kernel"] = {"lora_a": (L, D, r), "lora_b": (L, r, H, hd)}``. A kernel
whose first logical axis is ``layers`` (stacked layers, scanned) keeps that leading dim in A and B.
Each target names how many of the kernel's dims (after ``layers``) are "in" dims; the rest are "out":
q/k/v kernels (L, D, H|K, hd) have in = (D,), out = (H|K, hd); o_kernel (L, H, hd, D) has in = (H, hd),
out = (D,). A and B carry logical axes (``("layers", "embed", "lora_rank")``, ``("layers",
"lora_rank", "heads", "head_dim")``) so they shard like their base kernel; ``lora_rank`` is not in the
default rules table, so it is replicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax.interop import safetensors_io

RANK_AXIS = "lora_rank"
A_KEY, B_KEY = "lora_a", "lora_b"
WEIGHTS_FILE = "lora.safetensors"
CONFIG_FILE = "lora_config.json"
FORMAT_VERSION = 1

# target name -> (path of the kernel in the pure params dict, number of "in" dims after a `layers` dim).
BACKBONE_TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "q": (("backbone", "layers", "q_kernel"), 1),        # (L, D, H, hd): in D, out (H, hd)
    "k": (("backbone", "layers", "k_kernel"), 1),        # (L, D, K, hd)
    "v": (("backbone", "layers", "v_kernel"), 1),        # (L, D, K, hd)
    "o": (("backbone", "layers", "o_kernel"), 2),        # (L, H, hd, D): in (H, hd), out D
    "gate": (("backbone", "layers", "gate_kernel"), 1),  # (L, D, F)
    "up": (("backbone", "layers", "up_kernel"), 1),      # (L, D, F)
    "down": (("backbone", "layers", "down_kernel"), 1),  # (L, F, D)
}
# Flow-matching head kernels, all plain (in, out) matrices, stacked ones with a leading `layers` dim.
HEAD_TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "mlp_in": (("head", "mlp_in_kernel"), 1),          # (N, d, d)
    "mlp_out": (("head", "mlp_out_kernel"), 1),        # (N, d, d)
    "ada": (("head", "ada_kernel"), 1),                # (N, d, 3d)
    "cond": (("head", "cond_kernel"), 1),              # (hidden, d)
    "time_in": (("head", "time_in_kernel"), 1),        # (256, d)
    "time_out": (("head", "time_out_kernel"), 1),      # (d, d)
    "input": (("head", "input_kernel"), 1),            # (token_dim, d)
    "final_ada": (("head", "final_ada_kernel"), 1),    # (d, 2d)
    "final": (("head", "final_kernel"), 1),            # (d, token_dim)
}

# Optimizer-state slots per trained parameter (each slot has the parameter's shape and dtype, as optax
# keeps them by default).
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "lion": 1, "momentum": 1, "sgd": 0}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters and their size. ``scale = alpha / rank`` multiplies A @ B.

  targets: backbone projections among q, k, v, o, gate, up, down (every layer).
  head_targets: flow-matching head kernels among mlp_in, mlp_out, ada, cond, time_in, time_out,
  input, final_ada, final.
  """
  rank: int = 32
  alpha: float = 32.0
  targets: tuple[str, ...] = ("q", "k", "v", "o")
  head_targets: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "head_targets", tuple(self.head_targets))
    self.validate()

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  def validate(self) -> None:
    if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
      raise ValueError(f"lora.rank={self.rank!r} must be a positive integer")
    if not math.isfinite(float(self.alpha)):
      raise ValueError(f"lora.alpha={self.alpha!r} must be a finite number")
    for field, names, known in (("lora.targets", self.targets, BACKBONE_TARGETS),
                                ("lora.head_targets", self.head_targets, HEAD_TARGETS)):
      bad = [n for n in names if n not in known]
      if bad:
        raise ValueError(f"{field} has unknown names {bad}; expected some of {list(known)}")
      dup = sorted({n for n in names if names.count(n) > 1})
      if dup:
        raise ValueError(f"{field} names {dup} more than once")
    if not self.targets and not self.head_targets:
      raise ValueError("lora.targets and lora.head_targets are both empty: nothing to adapt")

  def kernels(self) -> list[tuple[str, tuple[str, ...], int]]:
    """(target name, kernel path, number of in dims) of every targeted kernel, in a fixed order."""
    return ([(n, *BACKBONE_TARGETS[n]) for n in self.targets]
            + [(n, *HEAD_TARGETS[n]) for n in self.head_targets])

  @classmethod
  def from_config(cls, cfg: Any) -> "LoraConfig":
    """From ``config.lora`` (a ConfigDict or mapping with rank, alpha, targets, head_targets)."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    defaults = cls.__dataclass_fields__
    kwargs = {}
    for name in ("rank", "alpha", "targets", "head_targets"):
      value = get(name, None)
      kwargs[name] = defaults[name].default if value is None else value
    if isinstance(kwargs["targets"], str) or isinstance(kwargs["head_targets"], str):
      raise ValueError("lora.targets / lora.head_targets must be sequences of names, e.g. ('q', 'k'), "
                       "not one string")
    return cls(rank=int(kwargs["rank"]), alpha=float(kwargs["alpha"]), targets=tuple(kwargs["targets"]),
               head_targets=tuple(kwargs["head_targets"]))

  def to_json(self) -> dict:
    return {"rank": int(self.rank), "alpha": float(self.alpha), "targets": list(self.targets),
            "head_targets": list(self.head_targets)}


# ------------------------------------------------------------------------------------------------
# Tree helpers
# ------------------------------------------------------------------------------------------------
def _get(tree: Mapping, path: Sequence[str], what: str) -> Any:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"{what}: no entry {'/'.join(path[:i + 1])} (needed for LoRA target "
                     f"{'/'.join(path)})")
    node = node[key]
  return node


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


def _copy_along(tree: Mapping, paths: Sequence[Sequence[str]]) -> dict:
  """A copy of `tree` in which the dicts on the given paths are new (leaves shared): safe to assign into."""
  out = dict(tree)
  for path in paths:
    node = out
    for key in path[:-1]:
      node[key] = dict(node[key])
      node = node[key]
  return out


class _Split:
  """How one kernel splits into (layer dims, in dims, out dims)."""

  def __init__(self, name: str, path: tuple[str, ...], n_in: int, shape: tuple[int, ...], n_batch: int,
               axes: tuple[str | None, ...] | None = None):
    if axes is not None and len(axes) != len(shape):
      raise ValueError(f"LoRA target {name!r} ({'/'.join(path)}): logical axes {axes} do not match "
                       f"shape {shape}")
    if n_batch not in (0, 1) or len(shape) < n_batch + n_in + 1:
      raise ValueError(f"LoRA target {name!r} ({'/'.join(path)}): a kernel of shape {shape} cannot have "
                       f"{n_batch} layer dim(s), {n_in} in dim(s) and at least one out dim")
    self.n_batch = n_batch
    self.shape = shape
    self.batch = shape[:n_batch]
    self.ins = shape[n_batch:n_batch + n_in]
    self.outs = shape[n_batch + n_in:]
    self.axes = axes

  def a_shape(self, rank: int) -> tuple[int, ...]:
    return (*self.batch, *self.ins, rank)

  def b_shape(self, rank: int) -> tuple[int, ...]:
    return (*self.batch, rank, *self.outs)

  def a_axes(self) -> tuple[str | None, ...]:
    nb, ni = self.n_batch, len(self.ins)
    return (*self.axes[:nb], *self.axes[nb:nb + ni], RANK_AXIS)

  def b_axes(self) -> tuple[str | None, ...]:
    nb, ni = self.n_batch, len(self.ins)
    return (*self.axes[:nb], RANK_AXIS, *self.axes[nb + ni:])


def _splits(params: Mapping, cfg: LoraConfig, axes: Mapping) -> list[tuple[str, tuple[str, ...], _Split]]:
  """Every targeted kernel's split; a kernel whose first logical axis is ``layers`` is stacked."""
  out = []
  for name, path, n_in in cfg.kernels():
    w = _get(params, path, "base params")
    kernel_axes = tuple(_get(axes, path, "axes"))
    n_batch = 1 if kernel_axes[:1] == ("layers",) else 0
    out.append((name, path, _Split(name, path, n_in, tuple(np.shape(w)), n_batch, kernel_axes)))
  return out


# ------------------------------------------------------------------------------------------------
# Init, apply, merge
# ------------------------------------------------------------------------------------------------
def targeted_kernels(params: Mapping, cfg: LoraConfig) -> dict[str, Any]:
  """{target name: base kernel} of the kernels `cfg` adapts (KeyError naming a missing one)."""
  return {name: _get(params, path, "base params") for name, path, _ in cfg.kernels()}


def lora_axes(abstract_params: Mapping, axes: Mapping, cfg: LoraConfig) -> dict:
  """The logical axes of the adapter tree (tuples at the leaves), like ``train.abstract_model``'s axes."""
  out: dict = {}
  for _, path, s in _splits(abstract_params, cfg, axes):
    _set(out, path, {A_KEY: s.a_axes(), B_KEY: s.b_axes()})
  return out


def init_lora(abstract_params: Mapping, axes: Mapping, cfg: LoraConfig, key: jax.Array
              ) -> tuple[dict, dict]:
  """(lora_params, lora_axes) for the targeted kernels of `abstract_params`.

  abstract_params: the model's pure params dict (ShapeDtypeStructs or arrays; only shapes and dtypes
  are read). A is drawn like a PyTorch Linear's default init (kaiming-uniform with a = sqrt(5), i.e.
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = the product of the in dims), independently for
  every layer; B is zero, so ``apply_lora`` returns the base weights exactly at init. A and B take
  the base kernel's dtype. Traceable: run it under ``jax.jit(..., out_shardings=...)`` (taking [0])
  to create the adapters on their shards.
  """
  lora: dict = {}
  for i, (_, path, s) in enumerate(_splits(abstract_params, cfg, axes)):
    dtype = _get(abstract_params, path, "base params").dtype
    bound = 1.0 / math.sqrt(math.prod(s.ins))
    a = jax.random.uniform(jax.random.fold_in(key, i), s.a_shape(cfg.rank), jnp.float32, -bound, bound)
    _set(lora, path, {A_KEY: a.astype(dtype), B_KEY: jnp.zeros(s.b_shape(cfg.rank), dtype)})
  return lora, lora_axes(abstract_params, axes, cfg)


def abstract_lora(abstract_params: Mapping, axes: Mapping, cfg: LoraConfig) -> dict:
  """The adapter tree as ShapeDtypeStructs (nothing allocated): restore targets, memory estimates."""
  return jax.eval_shape(lambda k: init_lora(abstract_params, axes, cfg, k)[0], jax.random.key(0))


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: Sequence[int], n_batch: int, scale: float
               ) -> jax.Array:
  """scale * A @ B in fp32, reshaped to the kernel's shape.

  a: (*batch, *in, r); b: (*batch, r, *out). The contraction runs at HIGHEST precision so the merged
  export agrees with the adapted model on accelerators that would otherwise use bf16/TF32 passes.
  """
  batch = tuple(kernel_shape[:n_batch])
  r = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(*batch, -1, r)  # (*batch, I, r)
  b2 = b.astype(jnp.float32).reshape(*batch, r, -1)  # (*batch, r, O)
  d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
  return (scale * d).reshape(tuple(kernel_shape))


def apply_lora(base_params: Mapping, lora_params: Mapping, cfg: LoraConfig, dtype: Any = None) -> dict:
  """The adapted params: every targeted kernel W becomes W + (alpha/rank) * A @ B (summed in fp32).

  Pure jnp and structure-preserving (a new dict with the same keys as `base_params`; untargeted leaves
  are the same objects), so it runs inside a jitted loss; differentiate with respect to `lora_params`
  only to train the adapters. Raises KeyError/ValueError naming the target when a tree does not fit.

  dtype: the adapted kernels' dtype (default: each base kernel's own). Inside the loss, pass the
  model's compute dtype (``model.dtype``, e.g. bfloat16): the model casts every kernel to it before use,
  so the outputs and gradients are the same, while the merged copies of the targeted kernels and their
  gradients (which live through the step) take half the memory of fp32.
  """
  entries = cfg.kernels()
  out = _copy_along(base_params, [path for _, path, _ in entries])
  for name, path, n_in in entries:
    w = _get(base_params, path, "base params")
    ab = _get(lora_params, path, "lora params")
    if not isinstance(ab, Mapping) or A_KEY not in ab or B_KEY not in ab:
      raise KeyError(f"lora params: {'/'.join(path)} must hold {A_KEY!r} and {B_KEY!r}")
    a, b = ab[A_KEY], ab[B_KEY]
    # A is (*layers, *in, r): its rank tells whether the kernel is stacked.
    s = _Split(name, path, n_in, tuple(np.shape(w)), np.ndim(a) - n_in - 1)
    want_a, want_b = s.a_shape(cfg.rank), s.b_shape(cfg.rank)
    if tuple(np.shape(a)) != want_a or tuple(np.shape(b)) != want_b:
      raise ValueError(f"LoRA target {name!r} ({'/'.join(path)}): adapters have shapes "
                       f"{tuple(np.shape(a))}, {tuple(np.shape(b))}; the base kernel {s.shape} with "
                       f"rank {cfg.rank} needs {want_a}, {want_b}")
    merged = w.astype(jnp.float32) + lora_delta(a, b, s.shape, s.n_batch, cfg.scale)
    _set(out, path, merged.astype(w.dtype if dtype is None else dtype))
  return out


def layer_dims(abstract_params: Mapping, axes: Mapping, cfg: LoraConfig) -> dict[tuple[str, ...], int]:
  """{kernel path: its number of layer dims (1 stacked, 0 not)} of every kernel `cfg` adapts: what
  ``merge_piece`` needs to know of a kernel."""
  return {path: s.n_batch for _, path, s in _splits(abstract_params, cfg, axes)}


def merge_piece(base_piece: np.ndarray, a: np.ndarray, b: np.ndarray, kernel_shape: Sequence[int], n_batch: int,
                scale: float, start: int | None = None, stop: int | None = None, axis: int = 0) -> np.ndarray:
  """``merge_lora``'s kernel W + scale A @ B (summed in fp32, in the base piece's dtype) for the piece
  ``W[start:stop]`` along `axis` (the whole kernel when `start` is None) of a kernel of `kernel_shape`:
  `base_piece` is that piece of W; `a`, `b` are the kernel's whole adapters. A stacked kernel's layer slice
  (axis 0) merges only those layers' adapters; any other piece is cut from the whole delta. The piece-wise
  export's merge (``interop.runs.export_workdir``)."""
  kernel_shape = tuple(int(d) for d in kernel_shape)
  if start is None:
    delta = lora_delta(jnp.asarray(a), jnp.asarray(b), kernel_shape, n_batch, scale)
  elif n_batch == 1 and axis == 0:
    shape = (stop - start,) + kernel_shape[1:]
    delta = lora_delta(jnp.asarray(a[start:stop]), jnp.asarray(b[start:stop]), shape, n_batch, scale)
  else:
    whole = lora_delta(jnp.asarray(a), jnp.asarray(b), kernel_shape, n_batch, scale)
    delta = whole[(slice(None),) * axis + (slice(start, stop),)]
  merged = jnp.asarray(base_piece).astype(jnp.float32) + delta
  return np.asarray(merged.astype(base_piece.dtype))


def merge_lora(base_params: Mapping, lora_params: Mapping, cfg: LoraConfig) -> dict:
  """Concrete merged weights for export (``interop.names.nextstep_to_tensors`` / ``hf.export_nextstep``
  take the result as an ordinary params dict). Runs eagerly kernel by kernel, so only the targeted
  kernels get new buffers (the untargeted leaves are the base's own arrays) and sharded inputs stay
  sharded."""
  return jax.block_until_ready(apply_lora(base_params, lora_params, cfg))


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (str(k),)))
    else:
      out[".".join(prefix + (str(k),))] = v
  return out


def save_lora(path: str | os.PathLike, lora_params: Mapping, cfg: LoraConfig,
              metadata: Mapping[str, Any] | None = None) -> None:
  """Writes the adapters to directory `path`: ``lora.safetensors`` (tensors named like
  ``backbone.layers.q_kernel.lora_a``) and ``lora_config.json`` (rank, alpha, targets, head_targets,
  format version and optional JSON-able `metadata`, e.g. the base model's name)."""
  path = os.fspath(path)
  tensors = _flat(lora_params)
  expected = {".".join(p + (k,)) for _, p, _ in cfg.kernels() for k in (A_KEY, B_KEY)}
  if set(tensors) != expected:
    raise ValueError(f"save_lora: the adapter tree has tensors {sorted(tensors)}, the config "
                     f"{cfg.to_json()} expects {sorted(expected)}")
  os.makedirs(path, exist_ok=True)
  safetensors_io.save_safetensors(os.path.join(path, WEIGHTS_FILE), {k: np.asarray(jax.device_get(v))
                                                                      for k, v in tensors.items()})
  doc = {"format_version": FORMAT_VERSION, **cfg.to_json(), "metadata": dict(metadata or {})}
  tmp = os.path.join(path, CONFIG_FILE + ".partial")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, os.path.join(path, CONFIG_FILE))


def load_lora(path: str | os.PathLike) -> tuple[dict, LoraConfig]:
  """(lora_params as numpy arrays, LoraConfig) from a directory written by ``save_lora``.

  Checks that the file holds exactly the config's adapters with rank-consistent shapes; errors name
  the file. Apply to base params with ``apply_lora`` / ``merge_lora`` (which also check the shapes
  against the base kernels).
  """
  path = os.fspath(path)
  cfg_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{cfg_file}: no LoRA config (expected {CONFIG_FILE} written by save_lora)")
  try:
    with open(cfg_file, encoding="utf-8") as f:
      doc = json.load(f)
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
  if not isinstance(doc, dict):
    raise ValueError(f"{cfg_file}: expected a JSON object")
  version = doc.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{cfg_file}: format_version {version!r}, this code reads {FORMAT_VERSION}")
  missing = [k for k in ("rank", "alpha", "targets", "head_targets") if k not in doc]
  if missing:
    raise ValueError(f"{cfg_file}: missing fields {missing}")
  try:
    cfg = LoraConfig(rank=doc["rank"], alpha=float(doc["alpha"]), targets=tuple(doc["targets"]),
                     head_targets=tuple(doc["head_targets"]))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{cfg_file}: {e}") from e
  st = safetensors_io.SafetensorsFile(weights_file)
  expected = {".".join(p + (k,)): (p, k) for _, p, _ in cfg.kernels() for k in (A_KEY, B_KEY)}
  names = set(st.names())
  if names != set(expected):
    raise ValueError(f"{weights_file}: tensors missing {sorted(set(expected) - names)}, unexpected "
                     f"{sorted(names - set(expected))} for the targets in {CONFIG_FILE}")
  n_in = {p: n for _, p, n in cfg.kernels()}
  lora: dict = {}
  for name, (p, k) in expected.items():
    x = np.array(st.get(name))  # an owned copy, not a view of the memory map
    n_batch = len(st.shape(".".join(p + (A_KEY,)))) - n_in[p] - 1
    rank_dim = -1 if k == A_KEY else n_batch
    if n_batch not in (0, 1) or x.ndim < 2 or x.shape[rank_dim] != cfg.rank:
      raise ValueError(f"{weights_file}: tensor {name} has shape {x.shape}, inconsistent with rank "
                       f"{cfg.rank} in {CONFIG_FILE}")
    _set(lora, p + (k,), x)
  return lora, cfg


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
def param_count(tree: Any) -> int:
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def param_bytes(tree: Any) -> int:
  return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def optimizer_memory_bytes(abstract_params: Any, lora_params: Any = None, optimizer: str = "adamw") -> int:
  """Bytes of optimizer state for training `abstract_params` in full (lora_params None) or only the
  adapters `lora_params` (abstract or concrete trees; only shapes and dtypes are read).

  Counts the per-parameter slots (Adam/AdamW: two moments, mu and nu, each of the parameter's shape
  and dtype, as optax keeps them: fp32 for this project's fp32 master weights); the few scalar
  counters are left out.
  """
  if optimizer not in OPTIMIZER_SLOTS:
    raise ValueError(f"optimizer={optimizer!r}; expected one of {sorted(OPTIMIZER_SLOTS)}")
  trained = abstract_params if lora_params is None else lora_params
  return OPTIMIZER_SLOTS[optimizer] * param_bytes(trained)
