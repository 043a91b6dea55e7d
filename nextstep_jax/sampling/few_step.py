"""A few-step flow-matching head: a copy of a run's head distilled to draw one image token in K head
evaluations (``nextstep_jax.training.head_distill`` trains it; ``python -m nextstep_jax.distill`` is its
command), and how a sampler selects it.

A head directory holds ``head.safetensors`` (the student's weights, named as the head's params:
``ada_kernel``, ``mlp_in_kernel``, ...) and ``head.json``: the sampling settings it was distilled for
(``evaluations`` K, ``cfg``, ``time_shift``, ``use_norm``), its teacher (steps, workdir, checkpoint step)
and the training's record. The student has the teacher's architecture, so the compiled sampler runs it
unchanged: ``with_head(model, dir)`` returns the model with its head weights replaced, and
``sampling_kwargs(meta)`` the sampler's settings: the Euler ODE on ``flow.ode_grid(K, time_shift)``, K
evaluations per token, at the guidance scale it was distilled for (the student learnt the guided
velocity of that scale: another scale would not be the trajectory it learnt).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from nextstep_jax import storage
from nextstep_jax.config import UserError
from nextstep_jax.interop import safetensors_io
from nextstep_jax.models import nextstep as ns

HEAD_FILE = "head.safetensors"
META_FILE = "head.json"
FORMAT = "nextstep-jax few-step head v1"
# head.json fields a sampler needs, and their types.
META_FIELDS = {"format": str, "evaluations": int, "cfg": float, "time_shift": float, "use_norm": bool,
               "teacher_steps": int, "head": dict}


def head_params(head) -> dict[str, nnx.Param]:
  """{param name: its nnx.Param} of a FlowHead (the names of its attributes)."""
  return {k: v for k, v in sorted(vars(head).items()) if isinstance(v, nnx.Param)}


def head_arrays(head) -> dict[str, np.ndarray]:
  """{param name: numpy array} of a FlowHead."""
  return {k: np.asarray(jax.device_get(v[...])) for k, v in head_params(head).items()}


def save_head(directory: str, head, meta: dict[str, Any]) -> None:
  """Writes ``head.safetensors`` and ``head.json`` into `directory` (created), each atomically."""
  os.makedirs(directory, exist_ok=True)
  missing = [k for k in META_FIELDS if k not in meta and k not in ("format", "head")]
  if missing:
    raise ValueError(f"few-step head metadata lacks {missing}")
  safetensors_io.save_safetensors(os.path.join(directory, HEAD_FILE), head_arrays(head))
  full = dict(meta, format=FORMAT, head=dict(dim=head.config.dim, num_layers=head.config.num_layers,
                                             cond_dim=head.config.cond_dim, token_dim=head.config.token_dim))
  tmp = os.path.join(directory, f".{META_FILE}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(full, f, indent=2)
  os.replace(tmp, os.path.join(directory, META_FILE))


def read_meta(directory: str) -> dict[str, Any]:
  """``head.json`` of a head directory (a URL: its copy in this host's cache, ``storage.local_input``),
  checked (UserError / FileNotFoundError naming the file)."""
  directory = storage.local_input(directory, "head")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"few-step head {directory}: no such directory")
  path = os.path.join(directory, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"few-step head {directory}: no {META_FILE} (python -m nextstep_jax.distill writes it)")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({e})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise UserError(f"{path}: not a few-step head description (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                    f"expected {FORMAT!r})")
  for name, kind in META_FIELDS.items():
    value = meta.get(name)
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok or (kind is int and isinstance(value, bool)):
      raise UserError(f"{path}: field {name!r} is {value!r}, expected a {kind.__name__}")
  if meta["evaluations"] < 1:
    raise UserError(f"{path}: evaluations={meta['evaluations']} must be >= 1")
  return meta


def load_head_arrays(directory: str, meta: dict[str, Any], model: ns.NextStep) -> dict[str, np.ndarray]:
  """The student's weights, checked against `model`'s head: the same names, shapes and architecture."""
  hc = model.config.head
  want = dict(dim=hc.dim, num_layers=hc.num_layers, cond_dim=hc.cond_dim, token_dim=hc.token_dim)
  if meta["head"] != want:
    raise UserError(f"few-step head {directory} was distilled for a head {meta['head']}, this model's is {want}")
  path = os.path.join(directory, HEAD_FILE)
  f = safetensors_io.SafetensorsFile(path)  # CheckpointError (a UserError) for a missing or truncated file
  ref = {k: (tuple(v[...].shape), v[...].dtype) for k, v in head_params(model.head).items()}
  missing, extra = sorted(set(ref) - set(f.names())), sorted(set(f.names()) - set(ref))
  if missing or extra:
    raise UserError(f"{path}: tensors do not match the head's params (missing {missing}, unexpected {extra})")
  out = {}
  for name, (shape, dtype) in ref.items():
    if tuple(f.shape(name)) != shape:
      raise UserError(f"{path}: tensor {name} has shape {list(f.shape(name))}, the head's param {list(shape)}")
    out[name] = f.get(name).astype(dtype)
  return out


def with_head(model: ns.NextStep, directory: str, meta: dict[str, Any] | None = None
              ) -> tuple[ns.NextStep, dict[str, Any]]:
  """(a model whose head weights are the few-step head's in `directory`, its metadata: `meta` when the
  caller read it already, ``read_meta``'s else). `model` is left as it was; the new head's arrays take the
  placement (sharding) of the params they replace."""
  directory = storage.local_input(directory, "head")  # a URL: staged once per host
  meta = read_meta(directory) if meta is None else meta
  arrays = load_head_arrays(directory, meta, model)
  out = nnx.clone(model)  # new Variables over the same arrays
  for name, var in head_params(out.head).items():
    var[...] = jax.device_put(arrays[name], var[...].sharding)
  return out, meta


def sampling_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
  """The sampler's settings for a few-step head: ODE, K steps, its guidance scale and time shift."""
  return dict(steps=int(meta["evaluations"]), sde=False, cfg=float(meta["cfg"]), time_shift=float(meta["time_shift"]),
              use_norm=bool(meta["use_norm"]))
