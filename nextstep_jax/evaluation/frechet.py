"""Fréchet distance between Gaussians fitted to feature sets (an "FID" with any feature extractor;
the demo uses the digit classifier's penultimate features in place of Inception's)."""

from __future__ import annotations

import numpy as np


def _check_features(x, name: str) -> np.ndarray:
  a = np.asarray(x, np.float64)
  if a.ndim != 2:
    raise ValueError(f"{name} must be (N, F) features, got shape {a.shape}")
  if a.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {a.shape[0]}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} holds non-finite values")
  return a


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
  w, v = np.linalg.eigh((c + c.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)) for two Gaussians.

  tr((C1 C2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
  PSD matrix C1^(1/2) C2 C1^(1/2), which has the same spectrum as C1 C2 (no scipy, no complex
  round-off). Result clipped at 0."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  f = mu1.shape[0]
  if mu1.shape != (f,) or mu2.shape != (f,) or cov1.shape != (f, f) or cov2.shape != (f, f):
    raise ValueError(f"Fréchet distance needs means (F,) and covariances (F, F) of one F; got "
                     f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
  s1 = _sqrtm_psd(cov1)
  m = s1 @ cov2 @ s1
  eig = np.linalg.eigvalsh((m + m.T) / 2.0)
  tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = mu1 - mu2
  fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
  return max(fd, 0.0)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """(mean (F,), covariance (F, F), unbiased) of features (N, F), in float64."""
  a = _check_features(feats, "features")
  return a.mean(axis=0), np.cov(a, rowvar=False)


def frechet_distance(feats_a, feats_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F)."""
  a = _check_features(feats_a, "feats_a")
  b = _check_features(feats_b, "feats_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feats_a has {a.shape[1]} features per row, feats_b {b.shape[1]}")
  return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# ------------------------------------------------------------------------------------------------
# Judging images with the classifier
# ------------------------------------------------------------------------------------------------
