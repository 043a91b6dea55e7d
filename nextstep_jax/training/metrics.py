"""Training metrics: TensorBoard event files, a console line, and a JSONL copy.

Only process 0 writes (other processes get a writer that does nothing), so every process can
call the same code. ``<workdir>/metrics.jsonl`` holds one JSON object per ``write_scalars``
call ({"step": ..., "time": ..., name: value, ...}); TensorBoard events go to
``<workdir>/tensorboard``; images also go to ``<workdir>/images/<name>_<step>.png``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nextstep_jax.data.images import image_grid

# The console line shows these first, in this order, when present; other scalars follow.
CONSOLE_KEYS = ("loss", "ce", "fm", "grad_norm", "lr", "step_time", "tokens_per_s")


def _to_float(v: Any) -> float:
  return float(np.asarray(v, dtype=np.float64).reshape(()))


def _fmt(name: str, v: float) -> str:
  if name == "lr":
    return f"lr {v:.3e}"
  if name == "step_time":
    return f"{v:.3f} s/step"
  if name == "tokens_per_s":
    return f"{v:,.0f} tok/s"
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f"{name} {v:.3e}"
  return f"{name} {v:.4f}"


class StepTimer:
  """Wall time and throughput between calls: ``lap(steps, tokens)`` after each logged step."""

  def __init__(self) -> None:
    self._last = time.perf_counter()

  def reset(self) -> None:
    """Restart the clock (e.g. after compilation, evaluation or a checkpoint save)."""
    self._last = time.perf_counter()

  def lap(self, steps: int, tokens: int) -> dict[str, float]:
    """{step_time, tokens_per_s} over the `steps` steps (and `tokens` tokens) since last lap."""
    now = time.perf_counter()
    dt, self._last = now - self._last, now
    dt = max(dt, 1e-9)
    return {"step_time": dt / max(steps, 1), "tokens_per_s": tokens / dt}


class MetricsWriter:
  """Scalars to TensorBoard + console + JSONL, images to TensorBoard + PNG (process 0 only).

  `console_every`: the console line is printed for steps that are a multiple of it (the TB
  and JSONL records are written on every call).
  """

  def __init__(self, workdir: str | os.PathLike, process_index: int | None = None,
               console_every: int = 1):
    if process_index is None:
      process_index = jax.process_index()
    self.workdir = os.fspath(workdir)
    self.active = process_index == 0
    self.console_every = max(int(console_every), 1)
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(self.workdir, exist_ok=True)
      self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")

  @property
  def jsonl_path(self) -> str:
    return os.path.join(self.workdir, "metrics.jsonl")

  def _writer(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tensorboard"))
    return self._tb

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes every scalar (numbers, numpy or jax scalars) for `step`."""
    if not self.active:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    tb = self._writer()
    for k, v in values.items():
      tb.add_scalar(k, v, global_step=int(step))
    record = {"step": int(step), "time": time.time(), **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if int(step) % self.console_every == 0:
      print(self.console_line(step, values), flush=True)

  @staticmethod
  def console_line(step: int, values: Mapping[str, float]) -> str:
    """'step 100 | loss 1.2345 | ce 3.2100 | ... | 0.123 s/step | 12,345 tok/s'."""
    keys = [k for k in CONSOLE_KEYS if k in values] + sorted(k for k in values
                                                              if k not in CONSOLE_KEYS)
    return " | ".join([f"step {int(step)}"] + [_fmt(k, values[k]) for k in keys])

  def write_images(self, step: int, name: str, images: np.ndarray) -> str | None:
    """Writes uint8 images ((N,)H,W,C; several become a grid) to TB and a PNG; returns its path."""
    if not self.active:
      return None
    from PIL import Image
    grid = image_grid(images)
    self._writer().add_image(name, grid, global_step=int(step), dataformats="HWC")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    out_dir = os.path.join(self.workdir, "images")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{safe}_{int(step):08d}.png")
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """All records of a metrics.jsonl file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def log(msg: str) -> None:
  """A line on the console of process 0 (every trainer's progress and notices)."""
  if jax.process_index() == 0:
    print(msg, flush=True)
