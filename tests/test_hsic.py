"""HSIC Lasso pieces: kernels, statistics, the solver against scikit-learn, the exact path."""
import numpy as np
import pytest
import torch
from torch import nn

from apib_fx.hsic import (HSICStats, center, centred_kernels, kernel_matrices, nonneg_lasso,
                          nonneg_lasso_path, normalize)


def _naive(x, kind):
    B, d = x.shape
    k = torch.empty(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            diff = x[i] - x[j]
            if kind == "laplace":
                k[i, j] = torch.exp(-((0.5 / d) ** 0.5) * diff.norm())
            elif kind == "gaussian":
                k[i, j] = torch.exp(-(diff @ diff) / d)
            else:
                k[i, j] = x[i] @ x[j]
    return k


@pytest.mark.parametrize("kind", ["laplace", "gaussian", "linear"])
def test_kernels_match_naive(kind):
    x = torch.randn(7, 5, dtype=torch.float64) * 3 + 10
    assert torch.allclose(kernel_matrices(x, kind), _naive(x, kind), atol=1e-9)
    batched = kernel_matrices(torch.stack([x, 2 * x]), kind)
    assert torch.allclose(batched[1], _naive(2 * x, kind), atol=1e-9)


def test_center_and_normalize():
    k = kernel_matrices(torch.randn(6, 4, dtype=torch.float64))
    c = center(k)
    assert torch.allclose(c.sum(0), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(c.sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    n = normalize(torch.stack([c, torch.zeros_like(c)]))
    assert abs(float(torch.linalg.matrix_norm(n[0])) - 1) < 1e-12
    assert torch.equal(n[1], torch.zeros_like(c)) and torch.isfinite(n).all()


def _digits_activations(n=48):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x = torch.tensor(load_digits().images[:n], dtype=torch.float64).unsqueeze(1) / 16
    conv1 = nn.Conv2d(1, 16, 3, padding=1).double()
    conv2 = nn.Conv2d(16, 16, 3, padding=1).double()
    with torch.no_grad():
        a = torch.relu(conv1(x))
        y = conv2(a)
    return a.reshape(n, 16, -1), y.reshape(n, -1)


def _design(a, y, kind="laplace"):
    K = centred_kernels(a.transpose(0, 1), kind).reshape(a.shape[1], -1).T  # (B², C)
    L = centred_kernels(y, kind).reshape(-1)
    return K.numpy(), L.numpy()


@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_solver_matches_sklearn_on_real_activations(kind):
    from sklearn.linear_model import Lasso

    a, y = _digits_activations()
    X, t = _design(a, y, kind)
    stats = HSICStats(16, kernel=kind)
    stats.add(a, y)
    G, b = stats.gram()
    assert np.allclose(G.numpy(), X.T @ X, atol=1e-10) and np.allclose(b.numpy(), X.T @ t, atol=1e-10)
    n = X.shape[0]
    amax = float(b.max())
    for frac in (0.5, 0.1, 0.01, 0.001):
        alpha = frac * amax
        ours = nonneg_lasso(G, b, alpha).numpy()
        sk = Lasso(alpha=alpha / n, positive=True, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
        sk.fit(X, t)
        assert np.array_equal(ours > 1e-9, sk.coef_ > 1e-9), frac
        assert np.abs(ours - sk.coef_).max() < 1e-4, frac
        path = nonneg_lasso_path(G, b).coef_at(alpha).numpy()
        assert np.abs(path - ours).max() < 1e-6, frac


def test_path_consistent_with_solver_and_survival():
    a, y = _digits_activations(32)
    stats = HSICStats(16)
    stats.add(a, y)
    G, b = stats.gram()
    path = nonneg_lasso_path(G, b)
    assert torch.all(path.alphas[:-1] >= path.alphas[1:])
    for alpha in torch.linspace(float(path.alphas[-1]) * 2 + 1e-6, float(path.alphas[0]) * 0.99, 7).tolist():
        assert torch.allclose(path.coef_at(alpha), nonneg_lasso(G, b, alpha), atol=1e-6)
    for c in range(16):
        s = float(path.survival[c])
        if s > 0:
            assert float(nonneg_lasso(G, b, s * 1.001)[c]) == 0.0
            assert float(nonneg_lasso(G, b, s * 0.999)[c]) > 0.0


def test_duplicate_and_dead_channels():
    a, y = _digits_activations(32)
    a = a.clone()
    a[:, 5] = a[:, 2]  # exact duplicate of channel 2
    a[:, 9] = 0.0  # dead
    stats = HSICStats(16)
    stats.add(a, y)
    G, b = stats.gram()
    path = nonneg_lasso_path(G, b)
    assert float(path.survival[9]) == 0.0
    assert float(path.survival[5]) == 0.0 and float(path.survival[2]) > 0.0
    assert float(path.coefs[:, 5].abs().max()) == 0.0


def test_degenerate_inputs():
    p = nonneg_lasso_path(torch.eye(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64))
    assert torch.equal(p.survival, torch.zeros(3, dtype=torch.float64))
    p = nonneg_lasso_path(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    assert float(p.survival[0]) == 0.5


def test_stats_average_batches_sum_consumers():
    a, y = _digits_activations(32)
    s1, s2, both = HSICStats(16), HSICStats(16), HSICStats(16)
    s1.add(a[:16], y[:16])
    s2.add(a[16:], y[16:])
    both.add(a[:16], y[:16])
    both.add(a[16:], y[16:])
    assert torch.allclose(both.gram()[0], (s1.gram()[0] + s2.gram()[0]) / 2)
    both.add(a[:16], y[:16], consumer=1)
    assert torch.allclose(both.gram()[1], (s1.gram()[1] + s2.gram()[1]) / 2 + s1.gram()[1])


def test_path_speed_large_group():
    torch.manual_seed(0)
    x = torch.randn(512, 32, 20)
    k = centred_kernels(x).reshape(512, -1).double()
    G = k @ k.T
    b = k @ centred_kernels(torch.randn(32, 50)).reshape(-1).double()
    path = nonneg_lasso_path(G, b)
    assert (path.survival > 0).sum() > 10
