"""HSIC Lasso pieces: kernels, statistics, the solver against scikit-learn, the exact path."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from apib_fx import hsic
from apib_fx.hsic import (KERNELS, HSICStats, SurvivalPath, center, kernel_matrices, kkt_residual, nonneg_lasso,
                          nonneg_lasso_path, normalize)

sklearn = pytest.importorskip("sklearn")


def _naive(x: torch.Tensor, kind: str) -> torch.Tensor:
    B, d = x.shape
    k = torch.empty(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            diff = x[i] - x[j]
            if kind == "laplace":
                k[i, j] = math.exp(-math.sqrt(0.5 / d) * float(diff.norm()))
            elif kind == "gaussian":
                k[i, j] = math.exp(-float(diff @ diff) / d)
            else:
                k[i, j] = float(x[i] @ x[j])
    return k


# ---------------------------------------------------------------------------------------------
# kernels


@pytest.mark.parametrize("kind", KERNELS)
def test_kernels_match_naive_loop(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 5, generator=g, dtype=torch.float64) * 2 + 3
    k = kernel_matrices(x, kind)
    assert k.shape == (3, 9, 9) and k.dtype == torch.float64
    for c in range(3):
        assert torch.allclose(k[c], _naive(x[c], kind), rtol=1e-10, atol=1e-10)
    # float32 on features with a large common offset (ReLU-like): centring keeps it accurate.
    x32 = (torch.rand(7, 40, generator=g, dtype=torch.float64) + 20.0)
    k32 = kernel_matrices(x32.float(), kind)
    assert k32.dtype == torch.float32
    ref = _naive(x32, kind)
    assert float((k32.double() - ref).abs().max()) <= (1e-5 if kind != "linear" else 1e-6 * float(ref.abs().max()))


def test_unknown_kernel_lists_valid_kinds():
    with pytest.raises(ValueError, match="laplace.*gaussian.*linear"):
        kernel_matrices(torch.randn(4, 3), "sigmoid")
    with pytest.raises(ValueError, match="laplace"):
        HSICStats(3, kernel="rbf")


def test_center_and_normalize():
    k = kernel_matrices(torch.randn(2, 6, 4, dtype=torch.float64))
    c = center(k)
    assert torch.allclose(c.sum(-1), torch.zeros(2, 6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(c.sum(-2), torch.zeros(2, 6, dtype=torch.float64), atol=1e-12)
    H = torch.eye(6, dtype=torch.float64) - 1 / 6
    assert torch.allclose(c, H @ k @ H, atol=1e-12)
    n = normalize(torch.cat([c, torch.zeros(1, 6, 6, dtype=torch.float64)]))
    assert torch.allclose(torch.linalg.matrix_norm(n[:2]), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.equal(n[2], torch.zeros(6, 6, dtype=torch.float64)) and torch.isfinite(n).all()
    # A dead channel (constant features) centres to exactly zero and stays zero.
    dead = center(kernel_matrices(torch.zeros(1, 6, 4)))
    assert torch.equal(normalize(dead), torch.zeros(1, 6, 6))


# ---------------------------------------------------------------------------------------------
# realistic (G, b): a fixed small CNN on real images (scikit-learn's 8×8 digits)


def _digits_activations(n: int = 64):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x = torch.tensor(load_digits().images[:n], dtype=torch.float64).reshape(n, 1, 8, 8) / 16
    conv1 = nn.Conv2d(1, 16, 3, padding=1).double()
    conv2 = nn.Conv2d(16, 16, 3, padding=1).double()
    with torch.no_grad():
        a = torch.relu(conv1(x))
        y = conv2(a)
    return a.reshape(n, 16, -1), y.reshape(n, -1)


def _design(a: torch.Tensor, y: torch.Tensor, kind: str = "laplace"):
    """Explicit HSIC-Lasso design: columns vec(K̄_c), target vec(L̄)."""
    X = normalize(center(kernel_matrices(a.transpose(0, 1), kind))).reshape(a.shape[1], -1).T
    t = normalize(center(kernel_matrices(y, kind))).reshape(-1)
    return X.numpy(), t.numpy()


@pytest.fixture(scope="module")
def digits():
    a, y = _digits_activations()
    stats = HSICStats(16)
    stats.add(a, y)
    G, b = stats.gram()
    return a, y, G, b


def test_stats_match_explicit_design(digits):
    a, y, G, b = digits
    X, t = _design(a, y)
    assert np.allclose(G.numpy(), X.T @ X, atol=1e-12) and np.allclose(b.numpy(), X.T @ t, atol=1e-12)
    # Unit diagonal, except channels that are dead on these images (this seed has one: a real
    # dead ReLU), whose kernel centres to zero.
    dead = a.abs().amax(dim=(0, 2)) == 0
    assert bool(dead.any())
    assert torch.allclose(G.diagonal(), (~dead).double(), atol=1e-12)
    assert bool((b >= 0).all() and (b <= 1).all())
    # float32 activations (what the pruner feeds) give nearly the same statistics.
    s32 = HSICStats(16)
    s32.add(a.float(), y.float())
    G32, b32 = s32.gram()
    assert float((G32 - G).abs().max()) < 1e-4 and float((b32 - b).abs().max()) < 1e-4


@pytest.mark.parametrize("kind", ["laplace", "gaussian", "linear"])
def test_solver_matches_sklearn_lasso(kind):
    from sklearn.linear_model import Lasso

    a, y = _digits_activations()
    X, t = _design(a, y, kind)
    stats = HSICStats(16, kernel=kind)
    stats.add(a, y)
    G, b = stats.gram()
    n = X.shape[0]  # B² rows: sklearn minimises 1/(2n)‖t − Xw‖² + a‖w‖₁, so our α = n·a
    amax = float(b.max())
    supports = set()
    for frac in (0.5, 0.2, 0.05, 0.01, 1e-3):
        alpha = frac * amax
        ours = nonneg_lasso(G, b, alpha)
        assert kkt_residual(G, b, alpha, ours) < 1e-9
        sk = Lasso(alpha=alpha / n, positive=True, fit_intercept=False, tol=1e-12, max_iter=1_000_000).fit(X, t)
        o = ours.numpy()
        assert np.array_equal(o > 0, sk.coef_ > 0), (kind, frac, o, sk.coef_)
        assert np.abs(o - sk.coef_).max() < 1e-4, (kind, frac)
        supports.add(int((o > 0).sum()))
    assert min(supports) <= 3 and max(supports) >= 6  # both sparse and dense regimes were exercised


def test_path_matches_solver_and_sklearn_lars(digits):
    from sklearn.linear_model import lars_path

    a, y, G, b = digits
    path = nonneg_lasso_path(G, b)
    al = path.alphas.numpy()
    assert np.all(np.diff(al) < 0) and al[0] == pytest.approx(float(b.max()))
    assert torch.equal(path.coefs[0], torch.zeros(16, dtype=torch.float64))
    # Between breakpoints (where the coefficients are interpolated) against the solver.
    mids = [(al[i] + al[i + 1]) / 2 for i in range(0, len(al) - 1, max(1, len(al) // 8))]
    for alpha in mids + [al[0] * 0.7, al[0] * 1e-4]:
        assert float((path.coef_at(alpha) - nonneg_lasso(G, b, alpha)).abs().max()) < 1e-6, alpha
    # scikit-learn's LARS on the explicit design: its alphas are ours / n_samples.
    X, t = _design(a, y)
    sk_alphas, _, sk_coefs = lars_path(X, t, method="lasso", positive=True)
    sk_alphas = sk_alphas * X.shape[0]
    keep = sk_alphas > 10 * al[-1]
    assert np.allclose(sk_alphas[keep], al[: keep.sum()], rtol=1e-8, atol=1e-12)
    for i in np.flatnonzero(keep):
        assert np.abs(path.coef_at(sk_alphas[i]).numpy() - sk_coefs[:, i]).max() < 1e-6


def test_survival_is_consistent(digits):
    _, _, G, b = digits
    path = nonneg_lasso_path(G, b)
    surv = path.survival
    assert int((surv > 0).sum()) >= 4
    for c in range(16):
        s = float(surv[c])
        if s == 0:
            assert float(path.coefs[:, c].abs().max()) == 0.0
            continue
        assert float(nonneg_lasso(G, b, s * (1 + 1e-6))[c]) == 0.0
        assert float(path.coef_at(s * (1 + 1e-9))[c]) == 0.0
        assert float(nonneg_lasso(G, b, s * (1 - 1e-4))[c]) > 0.0
        assert float(path.coef_at(s * (1 - 1e-6))[c]) > 0.0
    # Without drop-outs, the active set at any α is exactly {c : survival_c > α}.
    for alpha in np.geomspace(float(surv.max()) * 0.999, float(path.alphas[-1]) * 10, 9):
        ok = ~path.left
        assert torch.equal(path.active_at(alpha)[ok], (surv > alpha)[ok])


def test_duplicate_and_dead_channels(digits):
    a, y, _, b0 = digits
    first = int(torch.argmax(b0))  # the channel that enters first
    dup = 15 if first != 15 else 14
    a = a.clone()
    a[:, dup] = a[:, first]
    a[:, 3] = 0.0  # dead
    stats = HSICStats(16)
    stats.add(a, y)
    G, b = stats.gram()
    assert torch.isfinite(G).all() and float(G[3].abs().max()) == 0.0 and float(b[3]) == 0.0
    assert float(G[first, dup]) == pytest.approx(1.0)
    path = nonneg_lasso_path(G, b)
    lo, hi = min(first, dup), max(first, dup)
    assert float(path.survival[lo]) == pytest.approx(float(b.max())) and float(path.survival[hi]) == 0.0
    assert float(path.coefs[:, hi].abs().max()) == 0.0
    assert float(path.survival[3]) == 0.0 and float(path.coefs[:, 3].abs().max()) == 0.0
    for frac in (0.5, 0.05):
        beta = nonneg_lasso(G, b, frac * float(b.max()))
        assert float(beta[lo]) > 0 and float(beta[hi]) == 0.0 and float(beta[3]) == 0.0
        assert kkt_residual(G, b, frac * float(b.max()), beta) < 1e-9


def test_degenerate_inputs():
    f64 = dict(dtype=torch.float64)
    p = nonneg_lasso_path(torch.eye(3, **f64), -torch.ones(3, **f64))
    assert torch.equal(p.survival, torch.zeros(3, **f64))
    assert torch.equal(p.coef_at(0.1), torch.zeros(3, **f64))
    assert torch.equal(nonneg_lasso(torch.eye(3, **f64), -torch.ones(3, **f64), 0.0), torch.zeros(3, **f64))
    p = nonneg_lasso_path(torch.zeros(2, 2, **f64), torch.zeros(2, **f64))
    assert torch.equal(p.survival, torch.zeros(2, **f64))
    # C = 1: β(α) = (b − α)/G.
    p = nonneg_lasso_path(torch.full((1, 1), 2.0, **f64), torch.tensor([0.5], **f64))
    assert float(p.survival[0]) == 0.5
    assert float(p.coef_at(0.1)[0]) == pytest.approx(0.2)
    assert float(nonneg_lasso(torch.full((1, 1), 2.0, **f64), torch.tensor([0.5], **f64), 0.1)[0]) == pytest.approx(0.2)
    # Singular G (identical columns): lowest index wins, deterministically.
    G = torch.tensor([[1.0, 1.0, 0.2], [1.0, 1.0, 0.2], [0.2, 0.2, 1.0]], **f64)
    b = torch.tensor([0.6, 0.6, 0.3], **f64)
    p = nonneg_lasso_path(G, b)
    assert float(p.survival[0]) == pytest.approx(0.6) and float(p.survival[1]) == 0.0
    beta = nonneg_lasso(G, b, 0.1)
    assert float(beta[1]) == 0.0 and torch.allclose(beta, p.coef_at(0.1), atol=1e-12)
    with pytest.raises(ValueError):
        nonneg_lasso_path(torch.eye(3, **f64), torch.ones(2, **f64))


@pytest.mark.parametrize("blocked_from", [None, 0])
def test_path_exact_on_larger_random_problem(blocked_from, monkeypatch):
    # blocked_from=0: every deletion's rotation chain takes the blocked products (the default
    # takes them for large chains only).
    if blocked_from is not None:
        monkeypatch.setattr(hsic, "_BLOCKED_CHAIN", blocked_from)
    g = torch.Generator().manual_seed(3)
    C, B = 300, 24  # B(B−1)/2 = 276 < C: G is singular, the path must cope
    z = torch.randn(B, 8, generator=g)
    x = 0.7 * z + torch.randn(C, B, 8, generator=g)
    stats = HSICStats(C)
    stats.add(x.transpose(0, 1), z @ torch.randn(8, 12, generator=g))
    G, b = stats.gram()
    path = nonneg_lasso_path(G, b)
    al = path.alphas.numpy()
    assert np.all(np.diff(al) < 0)
    assert bool(path.left.any())  # channels leave the path: the deletion update is exercised
    for alpha in np.geomspace(al[0] * 0.99, al[-1] * 100, 6):
        assert kkt_residual(G, b, alpha, path.coef_at(alpha)) < 1e-8, alpha
        assert float((path.coef_at(alpha) - nonneg_lasso(G, b, alpha)).abs().max()) < 1e-6
    # Exact between every pair of breakpoints, including right after each deletion.
    for lo, hi in zip(al[1:], al[:-1]):
        mid = 0.5 * (lo + hi)
        assert kkt_residual(G, b, mid, path.coef_at(mid)) < 1e-8, mid


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("B, m", [(5, 7), (40, 7), (300, 7), (40, 1)])
def test_triangle_kernels_match_full_matrices(kind, B, m):
    """The statistics work on the upper triangle of each kernel (half the elementwise work, and
    an index_add instead of a matmul for large B); they must equal the full-matrix definition.
    m = 1: one feature per sample (pooled channels), taken in the (channel, sample) layout scoring
    hands over (a transposed view), where the products are formed without a matmul."""
    from apib_fx.hsic import _unit_centred_vectors

    def _sym_vectors(k):  # diagonal, then the upper triangle times √2
        iu = torch.triu_indices(B, B, offset=1)
        return torch.cat([k.diagonal(dim1=-2, dim2=-1), k[:, iu[0], iu[1]] * 2**0.5], dim=1)

    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 6, m, generator=g, dtype=torch.float64).relu().transpose(0, 1)
    x[1] += 50.0  # large common offset: distances are recomputed on centred features
    x[2] = 3.0  # constant channel: its centred kernel is zero, not noise blown up to norm 1
    want = _sym_vectors(normalize(center(kernel_matrices(x, kind))))
    want[2] = 0.0
    got = _unit_centred_vectors(x, kind)
    assert got.dtype == torch.float64 and got.shape == (6, B * (B + 1) // 2)
    assert float((got - want).abs().max()) < 1e-10
    assert float(got[2].abs().max()) == 0.0
    got32 = _unit_centred_vectors(x.float(), kind)
    assert float((got32 - want).abs().max()) < 1e-4
    # Every matrix offset (an output kernel): recomputed without gathering.
    alone = _unit_centred_vectors(x[1:2].float(), kind)
    assert float((alone[0] - want[1]).abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------
# statistics bookkeeping


def test_stats_average_batches_and_sum_consumers(digits):
    a, y, _, _ = digits
    one, two, both = HSICStats(16), HSICStats(16), HSICStats(16)
    one.add(a[:32], y[:32])
    two.add(a[32:], y[32:])
    both.add(a[:32], y[:32])
    both.add(a[32:], y[32:])
    G1, b1 = one.gram()
    G2, b2 = two.gram()
    G, b = both.gram()
    assert torch.allclose(G, (G1 + G2) / 2, atol=1e-14) and torch.allclose(b, (b1 + b2) / 2, atol=1e-14)
    both.add(a[:32], y[:32] * 2 + 1, consumer="other")
    G3, b3 = both.gram()
    one.add(a[:32], y[:32] * 2 + 1, consumer=7)
    Go, bo = one.gram()
    assert torch.allclose(Go, 2 * G1, atol=1e-14)  # same channels, two consumers: G counts twice
    assert torch.allclose(G3, G + G1, atol=1e-14) and torch.allclose(b3, b + (bo - b1), atol=1e-14)
    assert both.batches == {0: 2, "other": 1}


def test_stats_input_checks():
    s = HSICStats(4)
    with pytest.raises(RuntimeError):
        s.gram()
    with pytest.raises(ValueError):
        s.add(torch.randn(8, 3, 5), torch.randn(8, 2))
    with pytest.raises(ValueError):
        s.add(torch.randn(1, 4, 5), torch.randn(1, 2))
    with pytest.raises(ValueError):
        s.add(torch.randn(8, 4, 5), torch.randn(7, 2))
    s.add(torch.randn(8, 4, 6), torch.randn(8, 2, 2))  # y of any trailing shape is flattened
    G, b = s.gram()
    assert G.shape == (4, 4) and b.shape == (4,) and G.dtype == torch.float64 and G.device.type == "cpu"


def test_shared_channel_terms_give_the_same_statistics(digits):
    a, y, _, _ = digits
    fresh, shared = HSICStats(16), HSICStats(16)
    terms = shared.channel_terms(a[:32])
    for consumer, target in ((0, y[:32]), (1, y[:32] * 2 + 1)):
        fresh.add(a[:32], target, consumer=consumer)
        shared.add(a[:32], target, consumer=consumer, terms=terms)
    shared.add(a[:32], y[:32], consumer=0, terms=terms)  # a later batch adds in place: terms stay intact
    fresh.add(a[:32], y[:32], consumer=0)
    for (G1, b1), (G2, b2) in [(fresh.gram(), shared.gram())]:
        assert torch.equal(G1, G2) and torch.equal(b1, b2)
    assert torch.equal(terms[1], shared.channel_terms(a[:32])[1])


def test_solvers_restore_thread_count_when_run_concurrently():
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(5)
    problems = []
    for _ in range(8):
        x = torch.randn(40, 30, generator=g, dtype=torch.float64)
        problems.append((x.T @ x, x.T @ torch.randn(40, generator=g, dtype=torch.float64)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(lambda p: nonneg_lasso_path(*p), problems))
            fits = list(pool.map(lambda p: nonneg_lasso(*p, 0.1), problems))
        assert torch.get_num_threads() == 2
        for (G, b), path, fit in zip(problems, paths, fits):
            assert torch.equal(path.survival, nonneg_lasso_path(G, b).survival)
            assert float((fit - nonneg_lasso(G, b, 0.1)).abs().max()) == 0.0
    finally:
        torch.set_num_threads(before)


def test_self_gram_blocks_match_the_plain_product():
    from apib_fx.hsic import _self_gram

    # Long vectors (B(B+1)/2 >= 512: B >= 32) take the blocked product, whose off-diagonal blocks
    # are computed once and mirrored; short ones the plain product (symmetric only up to rounding:
    # BLAS does not promise k kᵀ bit-symmetric, and some builds are not).
    gen = torch.Generator().manual_seed(0)
    for width in (528, 45):
        k = torch.randn(601, width, generator=gen, dtype=torch.float64)
        G = _self_gram(k, leaf=100)
        assert float((G - k @ k.T).abs().max()) < 1e-12 * width
    long = torch.randn(601, 528, generator=gen, dtype=torch.float64)
    G = _self_gram(long, leaf=100)
    assert torch.equal(G[:300, 300:], G[300:, :300].T)


@pytest.mark.parametrize("backend", ["mkldnn", "cuda"])
def test_statistics_use_full_float32_products_whatever_the_process_allows(digits, backend):
    """A process set to reduced-precision float32 products (bfloat16 on CPUs with AMX, TF32 on
    NVIDIA GPUs) still gets full float32 distances and Grams; its setting comes back after."""
    a, y, _, _ = digits
    a, y = a.float() * 10 + 5, y.float()
    ref = HSICStats(16)
    ref.add(a, y)
    ref_kernels = kernel_matrices(a.transpose(0, 1))
    matmul = getattr(torch.backends, backend).matmul
    before = matmul.fp32_precision
    seen = []
    real = hsic._unit_centred_vectors
    try:
        matmul.fp32_precision = "bf16" if backend == "mkldnn" else "tf32"
        s = HSICStats(16)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hsic, "_unit_centred_vectors", lambda f, kind: seen.append(matmul.fp32_precision) or real(f, kind))
            s.add(a, y)
        kernels = kernel_matrices(a.transpose(0, 1))
        assert matmul.fp32_precision == ("bf16" if backend == "mkldnn" else "tf32")
    finally:
        matmul.fp32_precision = before
    assert seen and set(seen) == {"ieee"}
    for got, want in zip(s.gram(), ref.gram()):
        assert torch.equal(got, want)
    assert torch.equal(kernels, ref_kernels)


@pytest.mark.parametrize("m", [2, 15, 16, 17, 53, 160])
def test_rotation_chain_in_blocks_matches_the_plain_one(m, monkeypatch):
    """A deletion's rotation chain (rows p.. of the inverse factor) computed in blocks of rows
    equals the plain cumulative sums: chains shorter than, equal to and longer than one block,
    ending inside a block or at its end."""
    rng = np.random.default_rng(m)
    n = m + 40
    a = rng.standard_normal((n, n))
    R = np.linalg.inv(np.linalg.cholesky(a @ a.T / n + 0.1 * np.eye(n)))
    p = n - m
    rows = R[p:n]
    col = rows[:, p].copy()
    rho = np.sqrt(np.cumsum(col * col))
    keep, mix = col[1:] / (rho[:-1] * rho[1:]), rho[:-1] / rho[1:]
    plain, z_plain = hsic._rotation_chain(rows, col, rho, keep, mix)
    monkeypatch.setattr(hsic, "_BLOCKED_CHAIN", 0)
    blocked, z_blocked = hsic._rotation_chain(rows, col, rho, keep, mix)
    assert blocked.shape == plain.shape == (m - 1, n)
    scale = np.abs(R).max()
    assert np.abs(blocked - plain).max() < 1e-13 * scale and np.abs(z_blocked - z_plain).max() < 1e-13 * scale
    # And what it computes: the rows of the inverse factor of G with channel p removed.
    G = np.linalg.inv(R.T @ R)
    keep_idx = np.r_[:p, p + 1 : n]
    R_new = np.vstack([R[:p, keep_idx], blocked[:, keep_idx]])
    assert np.allclose(R_new.T @ R_new, np.linalg.inv(G[np.ix_(keep_idx, keep_idx)]), rtol=1e-8, atol=1e-8)


def test_path_with_an_active_set_beyond_the_initial_factor_size():
    """The inverse factor starts at 256 x 256 and grows: a path where most of 600 channels enter."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(600, 40, generator=g, dtype=torch.float64)
    G = torch.eye(600, dtype=torch.float64) + 0.01 * a @ a.T
    b = torch.rand(600, generator=g, dtype=torch.float64) + 0.5
    path = nonneg_lasso_path(G, b)
    assert int((path.coefs > 0).sum(dim=1).max()) > 300  # the active set went well past 256
    al = path.alphas.numpy()
    for alpha in np.geomspace(al[0] * 0.99, al[-1] * 10, 6):
        assert kkt_residual(G, b, alpha, path.coef_at(alpha)) < 1e-8
        assert float((path.coef_at(alpha) - nonneg_lasso(G, b, alpha)).abs().max()) < 1e-6


def test_path_walked_down_in_levels_is_the_whole_path(digits):
    # Real kernels, and correlated kernels of low rank (120 channels, rank 60: dozens of channels
    # leave and re-enter): descending level by level gives every survival above each level
    # exactly and 0 below it, and finishes as the path walked in one go.
    _, _, G, b = digits
    problems = [(G, b)]
    g = torch.Generator().manual_seed(0)
    K = (torch.randn(120, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 60, generator=g, dtype=torch.float64)
         + 0.3 * torch.randn(120, 60, generator=g, dtype=torch.float64))
    K = K / K.norm(dim=1, keepdim=True)
    problems.append((K @ K.T, K @ torch.randn(60, generator=g, dtype=torch.float64)))
    for G, b in problems:
        whole = nonneg_lasso_path(G, b)
        full = whole.survival
        walked = SurvivalPath(G, b)
        level = float(b.max())
        while level > 1e-8:
            s = torch.from_numpy(walked.descend(level))
            above = full > level
            assert torch.equal(s[above], full[above]) and bool((s[~above] == 0).all()), level
            assert not walked.finished
            level /= 3
        path = walked.finish()
        assert walked.finished and torch.equal(torch.from_numpy(walked.descend(0.5)), full)
        assert torch.equal(path.alphas, whole.alphas) and torch.equal(path.coefs, whole.coefs)
        assert torch.equal(path.survival, full) and torch.equal(path.left, whole.left)
    assert int(whole.left.sum()) > 20  # (the low-rank one: channels did leave and come back)
    # Survival alone (what the search walks): the same, without the coefficients of every event.
    light = SurvivalPath(G, b, record=False)
    assert torch.equal(torch.from_numpy(light.descend(float(b.max()) / 4)), torch.where(full > float(b.max()) / 4, full, 0.0))
    assert torch.equal(torch.from_numpy(light.descend(-math.inf)), full) and light.finished
    with pytest.raises(ValueError, match="survival alone"):
        light.finish()
