"""HSIC Lasso in Gram form: kernels, their statistics, the non-negative Lasso and its exact path.

APIB (Guo et al., ICCV 2023) scores the C input channels of a layer with

    min_{β ≥ 0}  ½ ‖L̄ − Σ_c β_c K̄_c‖²_F + α ‖β‖₁

where K̄_c is the centred kernel matrix (B × B, over B calibration samples) of channel c's features
and L̄ that of the consumer layer's output. Expanding the square gives

    ½ βᵀGβ − bᵀβ + α Σ_c β_c  (+ ½‖L̄‖², a constant),   G_ij = ⟨K̄_i, K̄_j⟩,  b_i = ⟨K̄_i, L̄⟩,

so once (G, b) are accumulated the solvers never touch B again. Everything here is pure tensor
math: the caller decides which activations are "channels" and which are "outputs".

Units: kernels are dimensionless. Every centred kernel is scaled to unit Frobenius norm, so
diag(G) = 1, b_c ∈ [0, 1] per consumer (a normalised HSIC) and α is on that same scale.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

KERNELS = ("laplace", "gaussian", "linear")

# A channel whose Gram diagonal is below this fraction of the largest is treated as dead (its
# kernel is numerically zero); it can never enter the Lasso.
_DEAD_DIAG = 1e-12
# Centred kernels whose Frobenius norm is below this many rounding units (relative to the raw
# kernel's norm, times B) are pure rounding noise and are set to zero rather than blown up to norm 1.
_NOISE_ULPS = 4.0
# Coordinate descent stops when a sweep moves no coefficient by more than this fraction of the
# largest one; the exact active-set finish takes it from there.
_CD_RTOL = 1e-2


def _check_kind(kind: str) -> None:
    if kind not in KERNELS:
        raise ValueError(f"unknown kernel {kind!r}; valid kinds: {', '.join(KERNELS)}")


def _work_dtype(x: Tensor) -> torch.dtype:
    # Half precision is far too coarse for distances; float64 input stays float64 (exact checks).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Centre features before the product when samples are this close relative to their norms.
_CENTRE_BELOW = 1e-2


def _sq_dists(x: Tensor) -> Tensor:
    """(..., B, d) -> (..., B, B) squared Euclidean distances, symmetric with an exact zero diagonal."""
    B, d = x.shape[-2:]
    flat = x.reshape(-1, B, d)
    dot = flat @ flat.transpose(-1, -2)
    sq = dot.diagonal(dim1=-2, dim2=-1)  # the norms come with the products: no extra pass over x
    d2 = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * dot
    # ‖a‖² + ‖b‖² − 2a·b loses precision when the samples share a large common offset (distances
    # small next to norms: ReLU features of a near-constant channel). Distances are translation
    # invariant, so those matrices are redone on features with the sample mean removed. Most are
    # not: centring every matrix would cost two more passes over all activations.
    ratio = d2 / (sq.unsqueeze(-1) + sq.unsqueeze(-2)).clamp_min(torch.finfo(d2.dtype).tiny)
    ratio.diagonal(dim1=-2, dim2=-1).fill_(math.inf)
    close = ratio.flatten(1).amin(dim=1) < _CENTRE_BELOW
    if bool(close.any()):
        xc = flat[close]
        xc = xc - xc.mean(dim=-2, keepdim=True)
        dc = xc @ xc.transpose(-1, -2)
        sc = dc.diagonal(dim1=-2, dim2=-1)
        d2[close] = sc.unsqueeze(-1) + sc.unsqueeze(-2) - 2.0 * dc
    d2 = 0.5 * (d2 + d2.transpose(-1, -2))
    d2.clamp_(min=0.0)
    d2.diagonal(dim1=-2, dim2=-1).zero_()
    return d2.reshape(*x.shape[:-2], B, B)


class _SharedSetting:
    """A process-wide setting held at ``value`` while any caller is inside ``with setting():``.
    Concurrent callers (a user pruning from several threads) share one save/restore: what the
    process had comes back when the last one leaves, not an interleaved value."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None], value: Any):
        self._get, self._put, self._value = get, put, value
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = self._get()
                self._put(self._value)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._put(self._saved)


# The backends whose float32 products a process can make faster and coarser (the per-backend
# setting of torch >= 2.9; the legacy set_float32_matmul_precision writes these too).
_MATMUL_BACKENDS = tuple(
    m for m in (getattr(getattr(torch.backends, b, None), "matmul", None) for b in ("mkldnn", "cuda"))
    if m is not None and hasattr(m, "fp32_precision")
)


def _put_fp32_precision(values: tuple[str, ...]) -> None:
    for backend, value in zip(_MATMUL_BACKENDS, values):
        backend.fp32_precision = value


# float32 matrix products in full float32 while kernel statistics are computed. A process set to
# faster float32 products (torch.set_float32_matmul_precision("medium"): bfloat16 on CPUs with AMX;
# "high": TF32 on NVIDIA GPUs) would otherwise compute distances from products with a 3-8 bit
# shorter mantissa, and ‖a‖² + ‖b‖² − 2a·b cancels most of what is left (bfloat16 products of
# 4096 features: errors of 0.5 where float32's are 1e-4). The user's setting comes back afterwards.
_full_float32_matmul = _SharedSetting(lambda: tuple(b.fp32_precision for b in _MATMUL_BACKENDS),
                                      _put_fp32_precision, ("ieee",) * len(_MATMUL_BACKENDS))


@_full_float32_matmul()
def kernel_matrices(x: Tensor, kind: str = "laplace") -> Tensor:
    """Kernel matrices of B samples: (..., B, d) features -> (..., B, B).

    ``laplace``: exp(−γ‖xi − xj‖₂), γ = sqrt(0.5/d) (the authors' default);
    ``gaussian``: exp(−γ‖xi − xj‖²), γ = 1/d; ``linear``: xi·xj.
    Computed in float32 (float64 if ``x`` is float64).
    """
    _check_kind(kind)
    if x.dim() < 2:
        raise ValueError(f"x must be (..., B, d), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d == 0:
        raise ValueError("x has zero features per sample (d = 0)")
    x = x.to(_work_dtype(x))
    if kind == "linear":
        k = x @ x.transpose(-1, -2)
        return 0.5 * (k + k.transpose(-1, -2))
    d2 = _sq_dists(x)
    if kind == "laplace":
        return torch.exp(-math.sqrt(0.5 / d) * d2.sqrt())
    return torch.exp(-d2 / d)


def center(k: Tensor) -> Tensor:
    """H K H with H = I − 11ᵀ/B on the last two dims (rows and columns then sum to zero)."""
    k = k - k.mean(dim=-1, keepdim=True)
    return k - k.mean(dim=-2, keepdim=True)


def normalize(k: Tensor, eps: float | Tensor = 0.0) -> Tensor:
    """Scale each (B, B) matrix to unit Frobenius norm; one with norm ≤ ``eps`` becomes all zero.

    Why: with unit-norm centred PSD kernels, b_c = ⟨K̄_c, L̄⟩ ∈ [0, 1] and diag(G) = 1 in every
    layer, whatever its width, resolution or activation scale, so one global α means the same thing
    everywhere (that is what lets APIB share a single α). A dead channel's kernel is constant,
    centres to exactly zero and must stay zero (not NaN): it then never enters the Lasso.
    ``eps`` may be a tensor broadcastable to (..., 1, 1) for per-matrix thresholds.
    """
    norm = torch.linalg.matrix_norm(k, ord="fro", keepdim=True)
    alive = norm > eps
    return torch.where(alive, k / torch.where(alive, norm, torch.ones_like(norm)), torch.zeros_like(k))


def centred_kernels(x: Tensor, kind: str = "laplace") -> Tensor:
    """normalize(center(kernel_matrices(x, kind))): (..., B, d) -> (..., B, B)."""
    return normalize(center(kernel_matrices(x, kind)))


# ----------------------------------------------------------------------------------------------
# Statistics


class _Pairs:
    """The pairs i < j of B samples, and the sums a_i + a_j over them, for kernels kept as their
    upper triangle: the elementwise work (distances, exp, centring) then runs on half the entries."""

    def __init__(self, B: int, device: torch.device, dtype: torch.dtype):
        iu = torch.triu_indices(B, B, offset=1, device=device)
        self.B = B
        self.i, self.j = iu[0], iu[1]
        self.flat = iu[0] * B + iu[1]
        # Incidence matrix (pairs x samples): sums over pairs become one small matmul, far faster
        # than scatter-adds. Its size grows as B³, so large batches use index_add instead.
        self.incidence = None
        if B <= 256:
            self.incidence = torch.zeros(self.flat.numel(), B, device=device, dtype=dtype)
            rows = torch.arange(self.flat.numel(), device=device)
            self.incidence[rows, self.i] = 1.0
            self.incidence[rows, self.j] = 1.0

    def spread(self, a: Tensor, shift: Optional[Tensor] = None) -> Tensor:
        """(n, B) -> (n, P): a_i + a_j for every pair, plus ``shift`` (n, 1) if given."""
        if self.incidence is not None:
            if shift is None:
                return a @ self.incidence.T
            return torch.addmm(shift, a, self.incidence.T)
        out = a[:, self.i] + a[:, self.j]
        return out if shift is None else out.add_(shift)

    def collect(self, v: Tensor) -> Tensor:
        """(n, P) -> (n, B): Σ over the pairs each sample is in."""
        if self.incidence is not None:
            return v @ self.incidence
        out = torch.zeros(v.shape[0], self.B, device=v.device, dtype=v.dtype)
        out.index_add_(1, self.i, v)
        return out.index_add_(1, self.j, v)


_PAIRS: dict[tuple, _Pairs] = {}


def _pairs(B: int, device: torch.device, dtype: torch.dtype) -> _Pairs:
    key = (B, str(device), dtype)
    if key not in _PAIRS:
        if len(_PAIRS) > 8:
            _PAIRS.clear()
        _PAIRS[key] = _Pairs(B, device, dtype)
    return _PAIRS[key]


def _products(f: Tensor, pairs: _Pairs) -> tuple[Tensor, Tensor]:
    """(n, B, m) features -> the squared norms ‖x_i‖² (n, B) and the products x_i·x_j over the
    pairs i < j (n, P) of each matrix's samples. With one feature per sample (a pooled channel: an
    SE block's or a classifier's input) these are plain products, taken directly: torch's batched
    matmul takes a per-matrix slow path for an inner size of 1 (~50x slower)."""
    if f.shape[-1] == 1:
        g = f[..., 0]
        return g * g, g.index_select(1, pairs.i) * g.index_select(1, pairs.j)
    if f.stride(-1) != 1:
        # Features read along a channels-last axis (a Linear in a ConvNeXt block or a ViT): each
        # sample's values of one channel lie C apart. The batched matmul would copy every (B, m)
        # matrix on its own (~100x slower than one copy of them all).
        f = f.contiguous()
    dot = f @ f.transpose(-1, -2)
    return dot.diagonal(dim1=-2, dim2=-1), dot.flatten(1).index_select(1, pairs.flat)


def _unit_centred_vectors(f: Tensor, kind: str) -> Tensor:
    """(n, B, m) features -> (n, B(B+1)/2) float64: the unit-Frobenius centred kernel of each of the
    n channels in symmetric-vector form (diagonal, then the upper triangle times √2), i.e.
    ``normalize(center(kernel_matrices(f, kind)))`` in that form (⟨vec(A), vec(C)⟩ = ⟨A, C⟩_F, so
    the Gram costs half as much), computed on the triangle only. A centred kernel whose norm is
    within a few rounding units of the raw kernel's norm is rounding noise and comes out all zero
    (a dead channel), not blown up to norm 1."""
    f = f.to(_work_dtype(f))
    n, B, m = f.shape
    pairs = _pairs(B, f.device, f.dtype)
    if kind == "linear":
        # H X Xᵀ H = (HX)(HX)ᵀ: centring the features first keeps the large common offset of ReLU
        # features out of the products.
        f = f - f.mean(dim=1, keepdim=True)
    sq, off = _products(f, pairs)  # ‖x_i‖², and x_i·x_j for i < j
    if kind == "linear":
        diag, k = sq.clone(), off
    else:
        d2 = pairs.spread(sq)  # ‖x_i‖² + ‖x_j‖²
        # ‖a‖² + ‖b‖² − 2a·b loses precision when the samples share a large common offset
        # (distances small next to norms: ReLU features of a near-constant channel). Distances are
        # translation invariant, so those channels are redone with the first sample subtracted
        # (as good as the mean here, and one pass less); most are not, and shifting every channel
        # would cost two more passes over all activations.
        close = torch.sub(d2, off, alpha=2.0 / (1.0 - _CENTRE_BELOW)).amin(dim=1) <= 0
        d2.sub_(off, alpha=2.0)
        if bool(close.any()):
            idx = torch.nonzero(close).squeeze(1)
            if idx.numel() == n:  # all of them (an output kernel): one copy, no gather
                fc = f - f[:, :1]
            else:
                fc = f.index_select(0, idx)
                fc -= fc[:, :1].clone()  # into the gathered copy: one allocation less
            sc, oc = _products(fc, pairs)
            d2[idx] = pairs.spread(sc).sub_(oc, alpha=2.0)
        d2.clamp_(min=0.0)
        k = d2.sqrt_().mul_(-math.sqrt(0.5 / m)) if kind == "laplace" else d2.mul_(-1.0 / m)
        k = k.exp_()
        diag = torch.ones(n, B, device=f.device, dtype=f.dtype)  # exp(0)
    # Noise floor from the raw kernel's norm: ‖K‖² = Σ diag² + 2 Σ off².
    raw = (diag.square().sum(dim=1) + 2.0 * torch.linalg.vector_norm(k, dim=1).square()).sqrt()
    # Centre: K̄_ij = K_ij − r_i − r_j + μ with r the row means and μ the grand mean.
    r = pairs.collect(k).add_(diag).div_(B)
    mu = r.mean(dim=1, keepdim=True)
    k.sub_(pairs.spread(r, -mu))
    diag = diag - 2.0 * r + mu
    norm = (diag.square().sum(dim=1) + 2.0 * torch.linalg.vector_norm(k, dim=1).square()).sqrt()
    eps = _NOISE_ULPS * B * torch.finfo(f.dtype).eps * raw
    scale = torch.where(norm > eps, 1.0 / torch.where(norm > eps, norm, torch.ones_like(norm)),
                        torch.zeros_like(norm)).unsqueeze(1)
    out = torch.empty(n, B + k.shape[1], device=f.device, dtype=torch.float64)
    out[:, :B] = diag.mul_(scale)
    out[:, B:] = k.mul_(scale * math.sqrt(2.0))
    return out


def _self_gram(k: Tensor, leaf: int = 256) -> Tensor:
    """k kᵀ computing each off-diagonal block once (a quarter less work per halving; torch has
    no symmetric rank-k product). Symmetric up to the rounding of the diagonal blocks. With short
    vectors (B < 32) the product is bound by writing G, and the block copies would cost more."""
    C = k.shape[0]
    if C <= leaf or k.shape[1] < 512:
        return k @ k.T
    h = C // 2
    G = torch.empty(C, C, dtype=k.dtype, device=k.device)
    G[:h, :h] = _self_gram(k[:h], leaf)
    G[h:, h:] = _self_gram(k[h:], leaf)
    G[:h, h:] = k[:h] @ k[h:].T
    G[h:, :h] = G[:h, h:].T
    return G


class HSICStats:
    """Gram-form statistics (G, b) of one channel group.

    Calibration batches of one consumer are averaged (more batches refine the estimate, they do not
    make the channels more important); consumers are summed (one β is shared by every layer that
    reads the group's channels, so each adds its own ½‖L̄ − ΣβK̄‖² term). Memory: O(C·B²) transient
    per call, O(C²) float64 kept per consumer.
    """

    def __init__(self, channels: int, kernel: str = "laplace"):
        _check_kind(kernel)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = int(channels)
        self.kernel = kernel
        # consumer -> [Σ_batches G, Σ_batches b, batch count]
        self._sums: dict[Hashable, list] = {}

    @property
    def batches(self) -> dict[Hashable, int]:
        """Batches added so far, per consumer."""
        return {k: v[2] for k, v in self._sums.items()}

    def _vectors(self, feats: Tensor) -> Tensor:
        """(N, B, m) -> (N, B(B+1)/2) float64: unit-norm centred kernels in symmetric-vector form."""
        N, B, m = feats.shape
        # Bound the transient (chunk, B, m) and (chunk, B, B) buffers to ~2^24 elements each.
        chunk = max(1, min(N, 2**24 // max(1, B * m), 2**24 // (B * B)))
        return torch.cat([_unit_centred_vectors(feats[s : s + chunk], self.kernel) for s in range(0, N, chunk)])

    def channel_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(k, G) of one batch of the group's channels ``x`` (B, C, m): the channels' kernel vectors
        (C, B(B+1)/2) and their Gram (C, C). Consumers reading the same tensor share them."""
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, m), got {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 samples per batch to centre kernels, got B = {x.shape[0]}")
        with torch.no_grad(), _full_float32_matmul():
            k = self._vectors(x.detach().transpose(0, 1))  # (C, P)
            G = _self_gram(k)
        return k, G

    def output_terms(self, y: Tensor) -> Tensor:
        """The output kernel of one batch, (B, ...) -> (B(B+1)/2,): what :meth:`add` regresses on.
        A layer reading several groups (a conv after a concat) computes it once for all of them."""
        with torch.no_grad(), _full_float32_matmul():
            return self._vectors(y.detach().reshape(1, y.shape[0], -1))[0]

    def add(self, x: Tensor, y: Tensor, consumer: Hashable = 0,
            terms: Optional[tuple[Tensor, Tensor]] = None, output: Optional[Tensor] = None) -> None:
        """Add one calibration batch seen by one consumer.

        ``x``: (B, C, m), each sample's C channels with m features each (flattened by the caller).
        ``y``: (B, n) or (B, ...), the consumer's output for the same samples. ``consumer``: any
        hashable slot; repeated slots are averaged over batches, distinct slots are summed.
        ``terms``: :meth:`channel_terms` of ``x`` when already computed for another consumer;
        ``output``: :meth:`output_terms` of ``y`` when already computed (same kernel kind).
        """
        k, G = terms if terms is not None else self.channel_terms(x)
        B = x.shape[0]
        if y.shape[0] != B:
            raise ValueError(f"y has {y.shape[0]} samples, x has {B}")
        with torch.no_grad():
            l = output if output is not None else self.output_terms(y)  # (P,)
            b = k @ l
        slot = self._sums.get(consumer)
        if slot is None:
            self._sums[consumer] = [G.clone() if terms is not None else G, b, 1]
        else:
            slot[0] += G
            slot[1] += b
            slot[2] += 1

    def gram(self) -> tuple[Tensor, Tensor]:
        """(G, b): Σ over consumers of the batch means. float64 on the CPU, shapes (C, C) and (C,);
        G is symmetric up to rounding (the solvers symmetrise it)."""
        if not self._sums:
            raise RuntimeError("HSICStats.gram(): no batches were added")
        G = b = None
        for sG, sb, n in self._sums.values():
            mG, mb = sG.cpu().double() / n, sb.cpu().double() / n
            G, b = (mG, mb) if G is None else (G.add_(mG), b.add_(mb))
        return G, b


# ----------------------------------------------------------------------------------------------
# Solvers


def _symmetrize(a: np.ndarray, tile: int = 128) -> np.ndarray:
    """a <- (a + aᵀ)/2 in place, tile by tile: a whole-matrix transposed add walks memory column
    by column and takes ~5x longer on a few-thousand-channel Gram. Returns ``a``."""
    C = a.shape[0]
    for i in range(0, C, tile):
        d = a[i : i + tile, i : i + tile]
        d[...] = 0.5 * (d + d.T)
        for j in range(i + tile, C, tile):
            avg = 0.5 * (a[i : i + tile, j : j + tile] + a[j : j + tile, i : i + tile].T)
            a[i : i + tile, j : j + tile] = avg
            a[j : j + tile, i : i + tile] = avg.T
    return a


def _problem(G, b) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert (G, b) to float64 numpy: a symmetrised copy of G (the caller's is not touched)."""
    Gn = np.array(G.detach().cpu().double().numpy() if isinstance(G, Tensor) else G, dtype=np.float64)
    bn = (b.detach().cpu().double().numpy() if isinstance(b, Tensor) else np.asarray(b, dtype=np.float64))
    bn = bn.reshape(-1).copy()
    C = bn.size
    if Gn.shape != (C, C):
        raise ValueError(f"G must be ({C}, {C}) to match b, got {Gn.shape}")
    if not (np.isfinite(Gn).all() and np.isfinite(bn).all()):
        raise ValueError("G and b must be finite")
    return _symmetrize(Gn), bn


def kkt_residual(G: Tensor, b: Tensor, alpha: float, beta: Tensor) -> float:
    """Largest violation of the optimality conditions of min_{β≥0} ½βᵀGβ − bᵀβ + αΣβ.

    With g = Gβ − b + α: |g_j| where β_j > 0, max(0, −g_j) where β_j = 0, and max(0, −β_j).
    """
    Gn, bn = _problem(G, b)
    bt = beta.detach().cpu().double().numpy() if isinstance(beta, Tensor) else np.asarray(beta, np.float64)
    g = Gn @ bt - bn + float(alpha)
    r = np.where(bt > 0, np.abs(g), np.maximum(0.0, -g))
    return float(max(r.max(initial=0.0), np.maximum(0.0, -bt).max(initial=0.0)))


# torch's intra-op threads at 1 while any solver runs (small dense solves: spinning BLAS threads
# only cost time there).
_one_thread = _SharedSetting(torch.get_num_threads, torch.set_num_threads, 1)


def _independent(A: Tensor) -> Tensor:
    """Mask of a maximal set of linearly independent columns of the PSD matrix ``A``, greedily in
    index order (so of duplicate channels the lowest index is kept)."""
    m = A.shape[0]
    keep = torch.zeros(m, dtype=torch.bool)
    L = torch.zeros(m, m, dtype=A.dtype)
    k = 0
    for i in range(m):
        w = torch.linalg.solve_triangular(L[:k, :k], A[keep, i].unsqueeze(1), upper=False).squeeze(1)
        s2 = float(A[i, i] - w @ w)
        if s2 > 1e-10 * float(A[i, i]):
            L[k, :k] = w
            L[k, k] = math.sqrt(s2)
            keep[i] = True
            k += 1
    return keep


def _spd_solve(A: Tensor, r: Tensor) -> Tensor:
    Lc, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(r.unsqueeze(1), Lc).squeeze(1)
    # Singular (duplicate channels): solve on an independent subset, lowest indices first; the
    # dependent ones get 0 and leave the support.
    keep = _independent(A)
    z = torch.zeros_like(r)
    z[keep] = _spd_solve(A[keep][:, keep], r[keep])
    return z


def _active_set_finish(G: Tensor, c: Tensor, x: Tensor, live: Tensor, tol: float) -> Tensor:
    """Exact min_{x≥0} ½xᵀGx − cᵀx from a feasible warm start (Lawson–Hanson style active set).

    Coordinate descent converges only linearly when channels are correlated (kernels of one layer
    usually are), so it is used to find most of the support; this finishes exactly with a few
    solves on it, adding the worst KKT violator at a time.
    """
    C = x.numel()
    P = x > 0
    x = torch.where(P, x, torch.zeros_like(x))
    for _ in range(3 * C + 20):
        for _ in range(C + 1):  # walk back until the solve on P is strictly positive
            idx = torch.nonzero(P).squeeze(1)
            z = torch.zeros_like(x)
            if idx.numel():
                z[idx] = _spd_solve(G[idx][:, idx], c[idx])
            bad = P & (z <= 0)
            if not bool(bad.any()):
                x = z
                break
            xb, zb = x[bad], z[bad]
            den = xb - zb
            steps = torch.where(den > 0, xb / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
            t = float(steps.min())
            x = x + t * (z - x)
            P[torch.nonzero(bad).squeeze(1)[steps <= t]] = False
            x = torch.where(P, x.clamp_min(0.0), torch.zeros_like(x))
        w = c - G @ x
        cand = live & ~P & (w > tol)
        if not bool(cand.any()):
            break
        P[int(torch.argmax(torch.where(cand, w, torch.full_like(w, -math.inf))))] = True
    return x


def nonneg_lasso(G: Tensor, b: Tensor, alpha: float, *, tol: float = 1e-10, max_iter: int = 10000) -> Tensor:
    """argmin_{β≥0} ½βᵀGβ − bᵀβ + α·Σβ, i.e. ½‖L̄ − Σ β_c K̄_c‖²_F + α‖β‖₁ up to a constant.

    Cyclic coordinate descent in Gram form (sweeps over the active set, full sweeps to let channels
    in; at most ``max_iter`` sweeps) finds the support; an exact active-set solve on it then brings
    the KKT residual (see :func:`kkt_residual`) down to ``tol``. Returns (C,) float64 on the CPU.
    """
    alpha = float(alpha)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    Gn, bn = _problem(G, b)
    C = bn.size
    beta = np.zeros(C)
    diag = np.diag(Gn).copy()
    if C == 0 or diag.max() <= 0:
        return torch.from_numpy(beta)
    live = diag > _DEAD_DIAG * diag.max()
    live_idx = np.flatnonzero(live).tolist()
    inv_diag = np.where(live, 1.0 / np.where(live, diag, 1.0), 0.0)
    grad = -bn  # Gβ − b, kept up to date column by column
    rows = [Gn[j] for j in range(C)]
    # A full sweep (lets channels in), then up to 10 sweeps over the support, and again: sweeping
    # only the support until it converges can take thousands of sweeps on correlated channels
    # while a missing channel waits outside.
    sweeps_since_full = 0
    for _ in range(max_iter):
        full = sweeps_since_full == 0
        idx = live_idx if full else np.flatnonzero(beta > 0).tolist()
        biggest = 0.0
        for j in idx:
            old = beta[j]
            new = old - (grad[j] + alpha) * inv_diag[j]
            if new < 0.0:
                new = 0.0
            d = new - old
            if d != 0.0:
                beta[j] = new
                grad += d * rows[j]
                if abs(d) > biggest:
                    biggest = abs(d)
        # Coarse is enough: the active-set finish below makes the answer exact.
        converged = biggest <= _CD_RTOL * max(1e-300, float(beta.max()))
        if converged and full:
            break
        sweeps_since_full = 0 if converged or sweeps_since_full >= 10 else sweeps_since_full + 1
    with _one_thread():  # small dense solves: spinning BLAS threads only cost time here
        return _active_set_finish(torch.from_numpy(Gn), torch.from_numpy(bn - alpha), torch.from_numpy(beta),
                                  torch.from_numpy(live), tol)


@dataclass(frozen=True)
class LassoPath:
    """The exact regularisation path of min_{β≥0} ½βᵀGβ − bᵀβ + αΣβ.

    ``alphas``: (K,) strictly decreasing breakpoints, float64, from max(b) (where β = 0) down to
    where the path stopped. ``coefs``: (K, C) coefficients at those breakpoints. ``survival``: (C,)
    for each channel the largest α at which its coefficient is non-zero (0 if it never is): the
    APIB score. Ranking by survival reproduces the active sets of a global α (exactly, while no
    channel has left the path; see ``left``), with ties broken however the caller likes.
    ``left``: (C,) bool, channels that entered and later dropped out again (their survival is
    the first entry; below it they may be inactive for a while).
    """

    alphas: Tensor
    coefs: Tensor
    survival: Tensor
    left: Tensor | None = None

    def coef_at(self, alpha: float) -> Tensor:
        """Coefficients at ``alpha`` (C,): linear between breakpoints, exact for the Lasso.

        Above the first breakpoint the answer is 0; below the last (the path stops at
        ~1e-9·max(b)) the last coefficients are returned.
        """
        alpha = float(alpha)
        a = self.alphas.numpy()
        if alpha >= a[0]:
            return self.coefs[0].clone()
        if alpha <= a[-1]:
            return self.coefs[-1].clone()
        j = int(np.searchsorted(-a, -alpha, side="right"))  # first breakpoint below alpha
        i = j - 1
        t = (a[i] - alpha) / (a[i] - a[j])
        return (1.0 - t) * self.coefs[i] + t * self.coefs[j]

    def active_at(self, alpha: float) -> Tensor:
        """(C,) bool: channels with a non-zero coefficient at ``alpha``."""
        return self.coef_at(alpha) > 0


def nonneg_lasso_path(G: Tensor, b: Tensor, *, min_ratio: float = 1e-9, max_steps: int | None = None) -> LassoPath:
    """The whole path of the non-negative Lasso in Gram form, by homotopy (LARS-Lasso, positive).

    Starting at α = max(b) with β = 0, α decreases; a channel enters when its correlation
    b_k − (Gβ)_k reaches α, a coefficient that would turn negative leaves. Between events β is
    linear in α, so the breakpoints describe the path exactly. The path stops at
    α = ``min_ratio``·max(b), or earlier where channels keep leaving and re-entering at one α (a
    degenerate cycle among ties; a Gram of low rank, from few calibration samples, ends that way
    near α = 0, silently; higher up with a warning). Ties enter lowest channel index first; a
    channel whose kernel is (numerically) a combination of the active ones, e.g. an exact
    duplicate, cannot enter, so of identical channels the lowest index survives and the others
    stay at zero. Dead channels (zero diagonal) never enter. Cost: O(C) events, each O(C·|A|)
    with rank-one updates of the inverse Cholesky factor of G_AA; float64 on the CPU.
    """
    return SurvivalPath(G, b, min_ratio=min_ratio, max_steps=max_steps).finish()


class SurvivalPath:
    """The path of :func:`nonneg_lasso_path`, walked down only as far as it is asked to.

    APIB needs each channel's survival α only above the global α the FLOPs target settles on,
    and a path's events grow dearer as its active set grows (most of a wide layer's cost lies
    far below that α). :meth:`descend` walks down to a level and returns the survival of every
    channel that entered above it; the others (0 there) enter at or below it, or never.
    :meth:`finish` completes the path: the same :class:`LassoPath` as :func:`nonneg_lasso_path`,
    however many levels came before. ``record=False`` keeps the survival alone (not the
    coefficients at every breakpoint, (events × C) floats): :meth:`finish` is then unavailable.
    """

    def __init__(self, G: Tensor, b: Tensor, *, min_ratio: float = 1e-9, max_steps: int | None = None,
                 record: bool = True):
        Gn, bn = _problem(G, b)
        C = self.channels = bn.size
        diag = np.diag(Gn)
        scale = float(diag.max()) if C else 0.0
        live = diag > _DEAD_DIAG * scale if scale > 0 else np.zeros(C, dtype=bool)
        bmax = float(bn[live].max()) if live.any() else -math.inf
        self._path: Optional[LassoPath] = None
        self._steps = None
        self._record = record
        self._survival: Optional[np.ndarray] = None  # once finished
        self._peak = np.zeros(1, dtype=np.int64)  # (the walk raises it as channels enter)
        if bmax <= 0:
            zeros = torch.zeros(C, dtype=torch.float64)
            self._path = LassoPath(torch.zeros(1, dtype=torch.float64), zeros.reshape(1, C).clone(), zeros.clone(),
                                   torch.zeros(C, dtype=torch.bool))
            self._survival = np.zeros(C)
            return
        # Work with diag(G) ≤ 1 so the tolerances below are relative; α scales with G, β does not.
        Gn /= scale  # our own copy
        self._scale = scale
        self._steps = _homotopy(Gn, bn / scale, live, min_ratio * bmax / scale,
                                max_steps if max_steps is not None else 20 * C + 100, record, self._peak)
        next(self._steps)

    @property
    def finished(self) -> bool:
        """Whether the path is complete (every survival is final)."""
        return self._survival is not None

    @property
    def max_active(self) -> int:
        """The most channels active at once on the path walked so far. It cannot exceed the
        rank of G: a path that reaches the rank selects no further channel without dropping one."""
        return int(self._peak[0])

    def _walk(self, level: float) -> Optional[np.ndarray]:
        try:
            return self._steps.send(level)
        except StopIteration as end:
            alphas, coefs, surv, left = end.value
            self._survival = surv * self._scale
            if self._record:
                self._path = LassoPath(
                    torch.tensor(alphas, dtype=torch.float64) * self._scale,
                    torch.from_numpy(np.stack(coefs)),
                    torch.from_numpy(self._survival.copy()),
                    torch.from_numpy(left),
                )
            self._steps = None
            return None

    def descend(self, alpha: float) -> np.ndarray:
        """Walk down to ``alpha`` (in G's units, as :attr:`LassoPath.survival`); returns the
        survival (C,) float64 so far: exact for every channel above ``alpha``, 0 for the rest."""
        if self._survival is None:
            surv = self._walk(float(alpha) / self._scale)
            if surv is not None:
                return surv * self._scale
        return self._survival.copy()

    def finish(self) -> LassoPath:
        """The whole path (walked to its end)."""
        if not self._record:
            raise ValueError("this path keeps the survival alone (record=False): walk it with descend()")
        if self._survival is None:
            self._walk(-math.inf)
        return self._path


# Rows x columns of the inverse factor below which a deletion's rotation chain is done with plain
# cumulative sums (the blocked products below cost a fixed ~0.2 ms in set-up).
_BLOCKED_CHAIN = 1 << 15
_CHAIN_BLOCK = 16


def _rotation_chain(rows: np.ndarray, col: np.ndarray, rho: np.ndarray, keep: np.ndarray,
                    mix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows a deletion leaves in the inverse factor, and the row it takes out (see ``drop`` in
    :func:`_homotopy`): with S_i = Σ_{j≤i} col_j rows_j, row i becomes keep_i S_i − mix_i rows_{i+1}
    (i < m − 1) and S_{m−1} / ρ_{m−1} leaves. Returns ((m − 1, n) rows, (n,) row).

    The prefix sums are the costly part (~a dozen passes over an m x n block at numpy speed: 13 ms
    for a 1000-row chain of a 1100-wide factor). Large chains are cut into blocks of b rows, each
    block's rows being one small matrix product over [S before the block, its b rows, the next
    row] (2-3x faster); the two differ by rounding (~1e-15 relative)."""
    m, n = rows.shape
    if m * n < _BLOCKED_CHAIN:
        S = rows * col[:, None]
        np.cumsum(S, axis=0, out=S)
        z = S[-1] / rho[-1]
        S = S[:-1]
        S *= keep[:, None]
        S -= rows[1:] * mix[:, None]
        return S, z
    b = _CHAIN_BLOCK
    nb = -(-m // b)
    full, rem = divmod(m, b)
    # W[k] = [S before block k, rows kb .. kb+b−1, row (k+1)b]; rows past m are zero.
    W = np.empty((nb, b + 2, n))
    W[:full, 1 : b + 1] = rows[: full * b].reshape(full, b, n)
    if rem:
        W[full, 1 : rem + 1] = rows[full * b :]
        W[full, rem + 1 :] = 0.0
    nxt = (m - 1) // b  # blocks followed by another row
    W[:nxt, b + 1] = rows[b::b][:nxt]
    W[nxt:, b + 1] = 0.0
    padded = np.zeros((3, nb * b))
    padded[0, :m] = col
    padded[1, : m - 1] = keep
    padded[2, : m - 1] = mix
    cb, kb, mb = (a.reshape(nb, b) for a in padded)
    part = np.matmul(cb[:, None, :], W[:, 1 : b + 1])[:, 0]  # Σ col_j rows_j within each block
    W[0, 0] = 0.0
    np.cumsum(part[:-1], axis=0, out=W[1:, 0])
    z = (W[-1, 0] + part[-1]) / rho[-1]
    K = np.zeros((nb, b, b + 2))
    K[:, :, 0] = kb
    K[:, :, 1 : b + 1] = kb[:, :, None] * cb[:, None, :] * np.tri(b)
    i = np.arange(b)
    K[:, i, i + 2] = -mb
    return np.matmul(K, W).reshape(nb * b, n)[: m - 1], z


def _rotate_left(a: np.ndarray, p: int, n: int) -> None:
    """In place: entries (rows) p+1..n-1 move down by one and entry p goes to n-1."""
    if p >= n - 1:
        return
    saved = a[p].copy()
    a[p : n - 1] = a[p + 1 : n]
    a[n - 1] = saved


def _homotopy(Gs: np.ndarray, bs: np.ndarray, live: np.ndarray, alpha_end: float, max_steps: int,
              record: bool = True, peak: Optional[np.ndarray] = None):
    """Path on the scaled problem, as a generator that walks down to the levels it is sent.

    Primed with ``next``, it takes a level with ``send`` and yields the survival array (C,) once
    the next event lies at or below that level (``survival`` is then final for every channel
    that entered above it, and every other channel's survival is at most the level); a later
    ``send`` of a lower level walks on from there. At ``alpha_end`` (or when the path ends) it
    returns (alphas, coefs, survival, left) in the scaled units, by StopIteration; without
    ``record`` ``coefs`` holds only the zeros at the start (a (C,) vector per event is the
    path's largest memory). ``peak[0]``, if given, is kept at the largest active set so far.

    Bookkeeping: ``perm`` lists the active set A first (positions [0, n), in the order of the
    factor), then the inactive channels; ``GA`` holds the rows of G for A in slots (``slot[i]`` is
    the row of factor position i), with columns in position order, and only its inactive columns
    [n, C) are kept up to date: the correlations of active channels are α by construction, so
    every event's product runs over the inactive columns alone (a third of a wide layer's columns
    are active near its cut). A channel that enters takes slot n; one that leaves hands its slot
    to the row in slot n−1 and gets its column written back, so an event moves at most one row
    and one or two columns of G, never a block. R = L⁻¹ with L Lᵀ = G_AA is kept explicitly, so
    every solve is a small mat-vec (numpy: its per-call overhead is a fraction of torch's at these
    sizes).
    With Y = R[1, b_A] and (u, v) = Rᵀ Y:
        β_A(α) = v − α u,    corr_k(α) = b_k − G_kA β_A = (b_k − G_kA v) + α (G_kA u),
    so channel k enters at α = (b_k − G_kA v) / (1 − G_kA u), and j leaves at α = v_j / u_j (u_j < 0).
    """
    C = bs.size
    G = np.ascontiguousarray(Gs)
    GA = np.empty((C, C))  # rows are written before they are read
    slot = np.zeros(C, dtype=np.int64)
    UVs = np.zeros((2, C))  # (u, v) in slot order, for the correlations
    bp = bs.copy()
    perm = np.arange(C)
    pos = np.arange(C)  # inverse of perm: each channel's position
    R = np.zeros((min(C, 256),) * 2)  # grows with the active set: most paths stay far below C
    Y = np.zeros((C, 2))
    UV = np.zeros((C, 2))
    n = 0
    bmax = float(bs[live].max())
    alpha = bmax
    tie = 1e-12 * bmax
    surv = np.zeros(C)
    left = np.zeros(C, dtype=bool)
    alphas = [alpha]
    coefs = [np.zeros(C)]
    last_added = last_dropped = -1
    # The α of each channel's last event, and how many events at the current α touched a channel
    # a second time (cycling, see below).
    seen_at = np.full(C, -1.0)
    revisits = 0
    since_refresh = 0

    def beta_at(a: float) -> np.ndarray:
        out = np.zeros(C)
        if n:
            out[perm[:n]] = np.maximum(UV[:n, 1] - a * UV[:n, 0], 0.0)
        return out

    def swap(i: int, j: int) -> None:
        # (two inactive positions: their columns of GA swap too)
        if i == j:
            return
        bp[i], bp[j] = bp[j], bp[i]
        perm[i], perm[j] = perm[j], perm[i]
        pos[perm[i]], pos[perm[j]] = i, j
        if n:
            GA[:n, [i, j]] = GA[:n, [j, i]]

    def refresh() -> None:
        # Recompute Y and (u, v) from R: the rank-one updates drift slowly.
        rhs = np.stack([np.ones(n), bp[:n]], axis=1)
        Y[:n] = R[:n, :n] @ rhs
        UV[:n] = R[:n, :n].T @ Y[:n]

    def add(q: int) -> bool:
        nonlocal n, R
        if n == R.shape[0]:
            bigger = np.zeros((min(C, 2 * n),) * 2)
            bigger[:n, :n] = R
            R = bigger
        swap(q, n)
        k = perm[n]
        if n:
            w = R[:n, :n] @ G[k, perm[:n]]  # L⁻¹ G_Ak, in the factor's order
            s2 = G[k, k] - float(w @ w)
        else:
            s2 = G[k, k]
        if s2 <= 1e-10 * G[k, k]:
            return False
        GA[n, n + 1 :] = G[k, perm[n + 1 :]]  # (its inactive columns: the others are never read)
        slot[n] = n
        s = math.sqrt(s2)
        if n:
            R[n, :n] = -(w @ R[:n, :n]) / s
            y_new = (np.array([1.0, bp[n]]) - w @ Y[:n]) / s
        else:
            y_new = np.array([1.0, bp[0]]) / s
        R[n, n] = 1.0 / s
        Y[n] = y_new
        UV[:n] += np.outer(R[n, :n], y_new)
        UV[n] = R[n, n] * y_new
        n += 1
        return True

    def drop(p: int) -> None:
        nonlocal n
        # Deleting index p from G_AA: Givens-rotate rows p..n−1 of R so that its column p collects
        # in the last row, then drop that row and the column (G_AA⁻¹ = RᵀR is unchanged by the
        # rotations). The rotation chain has a closed form: with col = R[p:n, p], ρ_i = ‖col[:i+1]‖
        # and S_i = Σ_{j≤i} col_j R[p+j] (the carried row is S_i / ρ_i), rotation i leaves
        #     row i = (col_{i+1} S_i / ρ_i − ρ_i R[p+i+1]) / ρ_{i+1},
        # so the whole chain is a few vectorised ops instead of a Python loop over rows
        # (:func:`_rotation_chain`).
        # Y = R·[1, b_A] rotates with R's rows; the dropped last row z takes its share of
        # (u, v) = RᵀY with it: (u, v) −= z ⊗ (z·[1, b_A]). No solve is redone.
        if p < n - 1:
            rows = R[p:n, :n]
            col = rows[:, p].copy()
            rho = np.sqrt(np.cumsum(col * col))  # ρ_0 = R[p, p] > 0 (diagonal of an inverse factor)
            keep = col[1:] / (rho[:-1] * rho[1:])
            mix = rho[:-1] / rho[1:]
            Y[p : n - 1], zy = _rotation_chain(Y[p:n], col, rho, keep, mix)  # (Y's rows rotate alike)
            S, z = _rotation_chain(rows, col, rho, keep, mix)
            # Then drop column p (shift the others left) and the last row, which now holds it.
            R[p : n - 1, :p] = S[:, :p]
            R[p : n - 1, p : n - 1] = S[:, p + 1 :]
        else:
            z, zy = R[p, :n].copy(), Y[p].copy()
        UV[:n] -= np.outer(z, zy)
        R[p : n - 1, n - 1] = 0.0
        R[n - 1, :n] = 0.0
        # Move p to the end of the active block (slice shifts: fancy indexing is several times slower).
        s = slot[p]
        if s != n - 1:  # the row in the last slot moves into the freed one
            GA[s] = GA[n - 1]
            slot[np.flatnonzero(slot[:n] == n - 1)] = s
        _rotate_left(slot, p, n)
        _rotate_left(bp, p, n)
        _rotate_left(perm, p, n)
        pos[perm[p:n]] = np.arange(p, n)
        _rotate_left(UV, p, n)
        n -= 1
        # The channel left at position n, now the first inactive one: its column of GA anew.
        GA[slot[:n], n] = G[perm[n], perm[:n]]
        Y[n] = 0.0
        UV[n] = 0.0

    # ``cand`` marks live, inactive, unblocked channels (in channel order).
    active = np.zeros(C, dtype=bool)
    cand = live.copy()
    stop = yield None  # the first level
    steps = 0
    while steps < max_steps:
        # Entering candidates, scored in position order over the inactive positions [n, C).
        ok = cand[perm[n:]]
        if n:
            u, v = UV[:n, 0], UV[:n, 1]
            UVs[:, slot[:n]] = UV[:n].T
            aq = UVs[:, :n] @ GA[:n, n:]
            den = 1.0 - aq[0]
            num = bp[n:] - aq[1]
            ok &= den > 1e-11 * max(1.0, float(np.abs(u).sum()))
        else:
            u = v = np.zeros(0)
            den, num = np.ones(C), bp
        ent = np.full(C - n, -math.inf)
        np.divide(num, den, out=ent, where=ok)
        np.minimum(ent, alpha, out=ent)
        if last_dropped >= 0:
            back = pos[last_dropped] - n  # (inactive: its entry in ent)
            if ent[back] >= alpha - tie:
                ent[back] = -math.inf
        out = np.full(n, -math.inf)
        neg = u < 0
        out[neg] = np.minimum(v[neg] / u[neg], alpha)
        if last_added >= 0 and n and out[pos[last_added]] >= alpha - tie:
            out[pos[last_added]] = -math.inf
        best_in = float(ent.max(initial=-math.inf))
        best_out = float(out.max(initial=-math.inf))
        best = max(best_in, best_out)
        if best <= stop and stop > alpha_end:
            # Paused: nothing above ``stop`` is left to happen. The next level resumes here
            # (this event's candidates are recomputed, from the same state).
            stop = yield surv
            continue
        steps += 1
        if best <= alpha_end:
            if alpha > alpha_end:
                alphas.append(alpha_end)
                if record:
                    coefs.append(beta_at(alpha_end))
            break
        if best < alpha:
            alphas.append(best)
            if record:
                coefs.append(beta_at(best))
            alpha = best
            revisits = 0
        if revisits > max(16, n):
            # Channels keep leaving and re-entering at one α: a degenerate cycle among ties, as
            # when G has low rank (fewer calibration samples than channels): a 4096-channel layer
            # with a rank-36 Gram swapped 10,000 times at α ≈ 1e-9·max(b) until max_steps (8 s).
            # The path ends here; channels that never entered keep survival 0.
            if alpha > 1e-6 * bmax:
                warnings.warn(f"nonneg_lasso_path: channels cycle among ties at alpha={alpha:.3g} "
                              f"(scaled); the path below it is missing", RuntimeWarning, stacklevel=3)
            break
        if best_out >= best_in:
            cands = np.flatnonzero(out >= best - tie)
            p = int(cands[np.argmin(perm[cands])])
            ch = int(perm[p])
            coefs[-1][ch] = 0.0  # it is leaving at exactly this α, not at v − αu's rounding (~1e-18)
            drop(p)
            revisits += seen_at[ch] == alpha
            seen_at[ch] = alpha
            left[ch] = True
            active[ch] = False
            cand = live & ~active  # a deletion unblocks every channel
            last_dropped, last_added = ch, -1
            since_refresh += 1
        else:
            ties = perm[n + np.flatnonzero(ent >= best - tie)]
            ch = int(ties.min())  # ties: lowest channel index
            cand[ch] = False
            if add(int(pos[ch])):
                revisits += seen_at[ch] == alpha
                seen_at[ch] = alpha
                active[ch] = True
                if surv[ch] == 0.0:
                    surv[ch] = alpha
                if peak is not None and n > peak[0]:
                    peak[0] = n
                last_added, last_dropped = ch, -1
                since_refresh += 1
            # else: numerically dependent on the active set, blocked until a deletion
        if since_refresh >= 64:
            refresh()
            since_refresh = 0
    else:
        warnings.warn(f"nonneg_lasso_path: stopped after {max_steps} events at alpha={alpha:.3g} "
                      f"(scaled); the path below it is missing", RuntimeWarning, stacklevel=3)
    # A channel that left and came back is still flagged: its active interval has a gap.
    return alphas, coefs, surv, left
