"""The label space's union-find against a plain reference, on random links."""
import numpy as np
import torch

from apib_fx.labels import NONE, LabelSpace


def _reference_root(parent: list[int], x: int) -> int:
    while parent[x] != x:
        x = parent[x]
    return x


def test_union_find_matches_a_reference_on_random_links():
    rng = np.random.default_rng(0)
    for _ in range(100):
        space, n = LabelSpace(), int(rng.integers(1, 300))
        space.fresh(n)
        ref = list(range(n))
        for _ in range(int(rng.integers(1, 20))):
            if rng.random() < 0.3:  # new ids between links, as layers hand them out
                extra = int(rng.integers(1, 50))
                space.fresh(extra)
                ref += range(n, n + extra)
                n += extra
            k = int(rng.integers(1, 30))
            a, b = rng.integers(0, n, k), rng.integers(0, n, k)
            space.link_ids(torch.from_numpy(a), torch.from_numpy(b))
            for x, y in zip(a.tolist(), b.tolist()):
                rx, ry = _reference_root(ref, x), _reference_root(ref, y)
                ref[max(rx, ry)] = min(rx, ry)
            query = torch.from_numpy(rng.integers(NONE, n, 17))
            want = [_reference_root(ref, v) if v != NONE else NONE for v in query.tolist()]
            assert space.classes(query).tolist() == want
        # every id's class is the smallest id tied to it
        assert space.roots.tolist() == [_reference_root(ref, i) for i in range(n)]
