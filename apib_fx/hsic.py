"""HSIC Lasso in Gram form: kernels, their statistics, and the non-negative Lasso and its path.

APIB's objective for one layer (Guo et al., ICCV 2023) is

    min_{β ≥ 0}  ½ ‖L̄ − Σ_c β_c K̄_c‖²_F + α ‖β‖₁

with K̄_c the centred kernel matrix of channel c over B samples and L̄ that of the consumer's
output. Expanding the square gives ½ βᵀGβ − bᵀβ + α Σβ (+ const) with G_ij = ⟨K̄_i, K̄_j⟩ and
b_i = ⟨K̄_i, L̄⟩, so once (G, b) are accumulated the solver's cost does not depend on B.

Every centred kernel is scaled to unit Frobenius norm (as in the HSIC Lasso literature). Then
b_c = ⟨K̄_c, L̄⟩ ∈ [0, 1] is a normalised HSIC (both matrices are PSD) and G's diagonal is 1, so one
global α means the same thing in every layer: that is what lets APIB share a single α.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

KERNELS = ("laplace", "gaussian", "linear")


def _sq_dists(x: Tensor) -> Tensor:
    # Centre first: distances do not change, and the mm-based formula loses far less precision.
    x = x - x.mean(dim=-2, keepdim=True)
    sq = (x * x).sum(-1)
    d = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (x @ x.transpose(-1, -2))
    d = d.clamp_min_(0.0)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    return d


def kernel_matrices(x: Tensor, kind: str = "laplace") -> Tensor:
    """(..., B, d) features of B samples -> (..., B, B) kernel matrices.

    laplace: exp(-γ‖xi−xj‖), γ = sqrt(0.5/d) (the authors' default); gaussian: exp(-‖xi−xj‖²/d);
    linear: xi·xj.
    """
    d = x.shape[-1]
    if kind == "laplace":
        return torch.exp(-(0.5 / d) ** 0.5 * _sq_dists(x).sqrt())
    if kind == "gaussian":
        return torch.exp(-_sq_dists(x) / d)
    if kind == "linear":
        return x @ x.transpose(-1, -2)
    raise ValueError(f"unknown kernel {kind!r}; expected one of {', '.join(KERNELS)}")


def center(k: Tensor) -> Tensor:
    """H K H with H = I − 11ᵀ/B, over the last two dims, without forming H."""
    k = k - k.mean(dim=-1, keepdim=True)
    return k - k.mean(dim=-2, keepdim=True)


def normalize(k: Tensor) -> Tensor:
    """Scale each (B, B) matrix to unit Frobenius norm; an all-zero one (a dead channel) stays zero."""
    norm = torch.linalg.matrix_norm(k, ord="fro", keepdim=True)
    return torch.where(norm > 0, k / norm.clamp_min(torch.finfo(k.dtype).tiny), torch.zeros_like(k))


def centred_kernels(x: Tensor, kind: str = "laplace") -> Tensor:
    return normalize(center(kernel_matrices(x, kind)))


class HSICStats:
    """Gram-form statistics (G, b) of one channel group: averaged over calibration batches of one
    consumer, summed over consumers (one β shared by every layer reading the channels)."""

    def __init__(self, channels: int, kernel: str = "laplace"):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
        self.channels = channels
        self.kernel = kernel
        self._sums: dict[int, tuple[Tensor, Tensor, int]] = {}

    def add(self, x: Tensor, y: Tensor, consumer: int = 0) -> None:
        """``x``: (B, C, m) the C channels' m features per sample; ``y``: (B, n) the consumer's output."""
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, m), got {tuple(x.shape)}")
        b = x.shape[0]
        k = centred_kernels(x.transpose(0, 1), self.kernel).reshape(self.channels, b * b)
        l = centred_kernels(y.reshape(b, -1), self.kernel).reshape(b * b)
        # float64 where it is cheap; the big groups' Gram in float32 is accurate to ~1e-6.
        if self.channels * b * b <= 2**25:
            k, l = k.double(), l.double()
        G = (k @ k.T).double().cpu()
        v = (k @ l).double().cpu()
        if consumer in self._sums:
            G0, v0, n = self._sums[consumer]
            self._sums[consumer] = (G0 + G, v0 + v, n + 1)
        else:
            self._sums[consumer] = (G, v, 1)

    def gram(self) -> tuple[Tensor, Tensor]:
        """(G, b) in float64 on the CPU."""
        if not self._sums:
            raise RuntimeError("no statistics were added")
        G = sum(s[0] / s[2] for s in self._sums.values())
        b = sum(s[1] / s[2] for s in self._sums.values())
        return G, b


def nonneg_lasso(G: Tensor, b: Tensor, alpha: float, *, tol: float = 1e-12, max_iter: int = 100000) -> Tensor:
    """argmin_{β≥0} ½βᵀGβ − bᵀβ + α·Σβ by cyclic coordinate descent (exact to ``tol``)."""
    G = np.asarray(G, dtype=np.float64)
    bb = np.asarray(b, dtype=np.float64)
    n = len(bb)
    beta = np.zeros(n)
    grad = -bb.copy()  # Gβ − b
    diag = np.diag(G).copy()
    for _ in range(max_iter):
        biggest = 0.0
        for j in range(n):
            if diag[j] <= 0:
                continue
            new = max(0.0, beta[j] - (grad[j] + alpha) / diag[j])
            delta = new - beta[j]
            if delta != 0.0:
                grad += delta * G[:, j]
                beta[j] = new
                biggest = max(biggest, abs(delta))
        if biggest <= tol:
            break
    return torch.from_numpy(beta)


@dataclass
class LassoPath:
    """The exact regularisation path of the non-negative Lasso in Gram form."""

    alphas: Tensor  # decreasing breakpoints
    coefs: Tensor  # (len(alphas), C) coefficients at each breakpoint
    survival: Tensor  # (C,) the largest α at which each coefficient is non-zero (0: never)

    def coef_at(self, alpha: float) -> Tensor:
        """Coefficients at ``alpha`` (linear between breakpoints, which is exact for the Lasso)."""
        a = self.alphas
        if alpha >= float(a[0]):
            return torch.zeros(self.coefs.shape[1], dtype=torch.float64)
        if alpha <= float(a[-1]):
            return self.coefs[-1].clone()
        i = int(torch.searchsorted(-a, torch.tensor(-alpha, dtype=a.dtype)))
        hi, lo = float(a[i - 1]), float(a[i])
        w = (hi - alpha) / (hi - lo)
        return (1 - w) * self.coefs[i - 1] + w * self.coefs[i]


def nonneg_lasso_path(G: Tensor, b: Tensor, *, min_ratio: float = 1e-9, keep_coefs: bool = True) -> LassoPath:
    """Homotopy (LARS-Lasso with positivity) from α = max(b) down to ``min_ratio``·max(b).

    Channels enter when their correlation b − Gβ reaches α and leave when their coefficient would
    turn negative. A channel whose kernel is a combination of the active ones (a duplicate) cannot
    enter: the active Cholesky factor rejects it, so of identical channels the lowest index wins.
    """
    G = torch.as_tensor(G, dtype=torch.float64).cpu()
    b = torch.as_tensor(b, dtype=torch.float64).cpu()
    C = b.numel()
    survival = torch.zeros(C, dtype=torch.float64)
    beta = torch.zeros(C, dtype=torch.float64)
    alphas, coefs = [], []
    if C == 0 or float(b.max()) <= 0:
        return LassoPath(torch.zeros(1, dtype=torch.float64), torch.zeros(1, C, dtype=torch.float64), survival)
    scale = float(torch.diagonal(G).max()) or 1.0
    eps = 1e-10 * scale
    alpha = float(b.max())
    alpha_min = min_ratio * alpha
    active: list[int] = []
    L = torch.zeros(0, 0, dtype=torch.float64)
    excluded = torch.zeros(C, dtype=torch.bool)  # dependent on the active set, or dead (zero kernel)
    excluded |= torch.diagonal(G) <= eps
    is_active = torch.zeros(C, dtype=torch.bool)

    def try_add(j: int) -> bool:
        nonlocal L
        g = G[active, j] if active else torch.zeros(0, dtype=torch.float64)
        w = torch.linalg.solve_triangular(L, g.unsqueeze(1), upper=False).squeeze(1) if active else g
        d2 = float(G[j, j] - w @ w)
        if d2 <= 1e-9 * float(G[j, j]):
            return False
        n = len(active)
        L2 = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        L2[:n, :n] = L
        L2[n, :n] = w
        L2[n, n] = d2 ** 0.5
        L = L2
        active.append(j)
        is_active[j] = True
        if survival[j] == 0:
            survival[j] = alpha
        return True

    def refactor() -> None:
        nonlocal L
        L = torch.linalg.cholesky(G[active][:, active]) if active else torch.zeros(0, 0, dtype=torch.float64)

    # First entry: the largest correlation, lowest index on ties.
    corr = b.clone()
    for j in torch.argsort(-b, stable=True).tolist():
        if float(b[j]) < alpha - eps:
            break
        if not excluded[j] and try_add(j):
            break
        excluded[j] = True
    alphas.append(alpha)
    coefs.append(beta.clone())
    for _ in range(10 * C + 10):
        if not active or alpha <= alpha_min:
            break
        ones = torch.ones(len(active), 1, dtype=torch.float64)
        d = torch.cholesky_solve(ones, L).squeeze(1)  # dβ_A per unit decrease of α
        a = G[:, active] @ d  # d(corr)/d(decrease of α)
        corr = b - G @ beta
        # entering: corr_j − γ a_j = α − γ
        denom = 1.0 - a
        cand = (~is_active) & (~excluded) & (denom > 1e-12)
        gamma_in = torch.full((C,), float("inf"), dtype=torch.float64)
        gamma_in[cand] = ((alpha - corr[cand]) / denom[cand]).clamp_min(0.0)
        # leaving: β_j + γ d_j = 0
        act = torch.tensor(active)
        gamma_out = torch.full((len(active),), float("inf"), dtype=torch.float64)
        neg = d < 0
        gamma_out[neg] = (-beta[act[neg]] / d[neg]).clamp_min(0.0)
        g_in, j_in = (float(gamma_in.min()), int(torch.argmin(gamma_in))) if bool(cand.any()) else (float("inf"), -1)
        g_out, k_out = float(gamma_out.min()), int(torch.argmin(gamma_out))
        gamma = min(g_in, g_out, alpha - alpha_min)
        beta[act] += gamma * d
        alpha -= gamma
        if gamma == g_out and g_out <= g_in:
            j = active.pop(k_out)
            is_active[j] = False
            beta[j] = 0.0
            refactor()
        elif gamma == g_in:
            if not try_add(j_in):
                excluded[j_in] = True
        beta.clamp_min_(0.0)
        alphas.append(alpha)
        if keep_coefs:
            coefs.append(beta.clone())
        if alpha <= alpha_min:
            break
    if not keep_coefs:
        coefs = [beta.clone()]
        alphas = [alphas[-1]]
    return LassoPath(torch.tensor(alphas, dtype=torch.float64), torch.stack(coefs), survival)
