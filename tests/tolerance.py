"""Tolerances for fp32 results of two code paths (jit vs eager, sharded vs single device, mesh vs one
device, scan vs unrolled, cached vs full, ours vs a PyTorch reference).

Such results agree only up to the reassociation of fp32 sums, and the rounding of a reassociated sum is
set by the size of its terms, not by the size of the result: a near-zero element of a matmul carries the
rounding of its large terms. So a bare absolute tolerance (``atol=1e-5``) is too tight for values of a
few units on hosts whose kernels reorder sums differently (AVX-512 / AMX Xeons), and too loose for small
values. The comparison here is

    |actual - desired| <= rtol * |desired| + atol_scale * scale,   scale = max |desired| (finite values)

with ``atol_scale = rtol`` unless given: relative to each value, plus the same relative amount of the
values' magnitude. Comparisons that must be bitwise (checkpoint round trips, export/import, resume) keep
``np.testing.assert_array_equal``; they do not belong here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

RTOL = 1e-5  # about 80 fp32 ulps: reassociation of the tiny models' sums, with room for other CPUs


def magnitude(x: Any) -> float:
  """max |x| over the finite values (0.0 for an empty or all-non-finite array)."""
  x = np.asarray(x, dtype=np.float64)
  return float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))


def tolerance(desired: Any, rtol: float = RTOL, atol_scale: float | None = None,
              scale: float | None = None) -> dict[str, float]:
  """``dict(rtol=..., atol=...)`` for ``np.testing.assert_allclose``: atol = atol_scale (default rtol)
  times `scale` (default max |desired|)."""
  scale = magnitude(desired) if scale is None else float(scale)
  return dict(rtol=rtol, atol=(rtol if atol_scale is None else atol_scale) * scale)


def assert_close_fp32(actual: Any, desired: Any, rtol: float = RTOL, atol_scale: float | None = None,
                      scale: float | None = None, err_msg: str = "") -> None:
  """``np.testing.assert_allclose`` with the magnitude-scaled tolerance above (scale: max |desired|)."""
  tol = tolerance(desired, rtol, atol_scale, scale)
  np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), err_msg=err_msg, **tol)


def assert_trees_close_fp32(actual: Any, desired: Any, rtol: float = RTOL, atol_scale: float | None = None,
                            err_msg: str = "") -> None:
  """Leaf by leaf, with one scale for the whole tree: max |desired| over all its leaves. For parameter
  trees after optimizer steps, whose rounding differences are the size of an update whatever a leaf's
  own magnitude (a zero-initialised bias is compared at the scale of the model's weights)."""
  leaves = [np.asarray(x) for x in jax.tree.leaves(desired)]
  scale = max((magnitude(x) for x in leaves), default=0.0)
  assert jax.tree.structure(actual) == jax.tree.structure(desired), err_msg
  for path_a, b in zip(jax.tree_util.tree_leaves_with_path(actual), leaves):
    path, a = path_a
    assert_close_fp32(a, b, rtol, atol_scale, scale,
                      err_msg=f"{err_msg} {jax.tree_util.keystr(path)}".strip())
