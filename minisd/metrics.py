"""Distances between sets of pictures, and how sure a rate is: FID, KID, Wilson and bootstrap intervals.

FID and KID compare two sets of feature vectors (N, D): one row per picture, from whatever encoder
suits the pictures (Inception-v3's pool features for photos; `minisd.shapes.features` for the shapes
world). They say nothing about any one picture, and their numbers mean nothing across encoders.

- Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule"): fit a
  Gaussian to each set and take the squared 2-Wasserstein distance between the two,

      FID = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½).                                    (1)

  It is biased: with N samples it is larger than the distance between the true distributions, by an
  amount that shrinks like 1/N (Chong & Forsyth 2020). Compare FIDs only at equal N, and report the
  FID between two independent sets of real pictures of the same N beside it: that is the floor.
- Kernel inception distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate
  of the squared maximum mean discrepancy with the cubic polynomial kernel k(x, y) = (xᵀy / D + 1)³,

      MMD²_u = Σ_{i≠j} k(a_i, a_j) / (m(m−1)) + Σ_{i≠j} k(b_i, b_j) / (m(m−1))
               − 2 Σ_{i,j} k(a_i, b_j) / m²,                                                       (2)

  averaged over random subsets of m rows of each set. Unbiased, so it can be slightly negative when
  the sets come from one distribution; its mean does not depend on m.

Both take NumPy arrays or torch tensors and compute in float64 on the CPU.

Adherence rates ("82% of the pictures show the right colour") come with an interval:
`wilson_interval` for a share of successes (Wilson 1927), `bootstrap_interval` for any statistic of
per-picture values (Efron 1979, the percentile bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def as_features(x, name: str = "features") -> np.ndarray:
    """A (N, D) array or tensor of finite numbers, N ≥ 2, as float64 NumPy; ValueError otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a (N, D) array of numbers, got {type(x).__name__} ({e})") from None
    if x.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (N, D): one row of D features per picture")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected at least 2 rows and 1 column")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name}[{bad[0]}, {bad[1]}] = {x[tuple(bad)]}; expected finite numbers (no NaN or inf)")
    return x


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_features(a, "a"), as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a has {a.shape[1]} features per row and b has {b.shape[1]}; expected the same width")
    return a, b


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """√Σ of a symmetric positive semi-definite matrix, from its eigendecomposition."""
    lam, V = np.linalg.eigh(sigma)
    # eigenvalues of a covariance are ≥ 0; rounding leaves some at -1e-17: they are 0
    return (V * np.sqrt(np.clip(lam, 0, None))) @ V.T


def frechet_distance(a, b) -> float:
    """Equation (1) between the Gaussians fitted to the rows of `a` (N_a, D) and `b` (N_b, D).

    μ is the row mean and Σ the unbiased sample covariance (N − 1 in the denominator), as in the
    reference FID code. Tr (Σ_a Σ_b)^½ is computed as Σ √λ_i over the eigenvalues of the symmetric
    positive semi-definite matrix √Σ_a Σ_b √Σ_a, which has the same eigenvalues as Σ_a Σ_b: no
    complex square roots, and singular covariances (N ≤ D, constant features) are fine."""
    a, b = _pair(a, b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False, ddof=1))  # (D, D)
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False, ddof=1))
    root_a = _psd_sqrt(sigma_a)
    M = root_a @ sigma_b @ root_a
    lam = np.linalg.eigvalsh((M + M.T) / 2)  # symmetrise away rounding before eigvalsh
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    fid = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * tr_covmean
    # a squared distance: a negative value is rounding (identical sets give about -1e-13), so 0
    return max(float(fid), 0.0)


def polynomial_mmd2(a, b) -> float:
    """Equation (2) on all rows: the unbiased MMD² with k(x, y) = (xᵀy / D + 1)³, m_a and m_b rows."""
    a, b = _pair(a, b)
    m, n, D = a.shape[0], b.shape[0], a.shape[1]
    k_aa, k_bb, k_ab = (a @ a.T / D + 1) ** 3, (b @ b.T / D + 1) ** 3, (a @ b.T / D + 1) ** 3
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2 * k_ab.mean())


def kid_subsets(a, b, subset_size: int = 1000, subsets: int = 100,
                generator: torch.Generator | None = None) -> np.ndarray:
    """(subsets,) values of equation (2), each on m = min(subset_size, N_a, N_b) rows of `a` and m
    rows of `b` drawn without replacement — the spread of these is the ± usually printed with KID.
    `generator` draws the rows; None means a fresh `torch.Generator` seeded with 0, so that the same
    sets always give the same number."""
    a, b = _pair(a, b)
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size = {subset_size!r}; expected an integer ≥ 2")
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets = {subsets!r}; expected an integer ≥ 1")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    m = min(subset_size, a.shape[0], b.shape[0])
    values = np.empty(subsets)
    for s in range(subsets):
        rows_a = torch.randperm(a.shape[0], generator=generator)[:m].numpy()
        rows_b = torch.randperm(b.shape[0], generator=generator)[:m].numpy()
        values[s] = polynomial_mmd2(a[rows_a], b[rows_b])
    return values


def kernel_inception_distance(a, b, subset_size: int = 1000, subsets: int = 100,
                              generator: torch.Generator | None = None) -> float:
    """The mean of `kid_subsets`: Bińkowski et al.'s KID between the rows of `a` and of `b`
    (100 subsets of 1000 rows, the usual setting; a set smaller than that is used whole in each)."""
    return float(kid_subsets(a, b, subset_size, subsets, generator).mean())


# ─── how sure a rate is ─────────────────────────────────────────────────────────────────────────

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a proportion p̂ = successes / n (z = 1.96: 95%):

        (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n).

    Unlike p̂ ± z √(p̂(1 − p̂)/n) it stays inside [0, 1] and is not empty at 0 or n successes
    (Newcombe 1998: 0 of 20 gives [0, 0.161])."""
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} = {value!r}; expected an integer")
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"successes = {successes}, n = {n}; expected n ≥ 1 and 0 ≤ successes ≤ n")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0:
        raise ValueError(f"z = {z!r}; expected a finite number > 0 (1.96 for 95%)")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 or n successes one end is exactly 0 or 1; keep rounding from moving it past
    return max(centre - half, 0.0), min(centre + half, 1.0)


def bootstrap_interval(values, stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 10_000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of `stat(values)`: `stat` of `n_boot` resamples (drawn with
    replacement, as many as `values`, from `np.random.default_rng(seed)`), and the (1 − level)/2 and
    (1 + level)/2 quantiles of those. For per-picture scores, per-prompt success (0/1) or any
    statistic with no formula for its spread; for a plain share of successes prefer `wilson_interval`."""
    x = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or not np.isfinite(x).all():
        raise ValueError(f"values: shape {x.shape}; expected a 1-D sequence of at least 2 finite numbers")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot = {n_boot!r}; expected an integer ≥ 100")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level = {level!r}; expected a number in (0, 1), e.g. 0.95")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, x.size, size=(n_boot, x.size))
    stats = np.array([stat(x[r]) for r in rows], dtype=np.float64)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
