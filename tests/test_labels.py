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


def test_block_and_mixed_keep_each_id_once_at_any_size():
    # Few positions are deduplicated by sorting, many (a ViT stream's labels) by marking: the
    # same sorted ids either way.
    space = LabelSpace()
    ids = space.fresh(50_000)
    gen = torch.Generator().manual_seed(0)
    for n in (10, 4095, 4096, 200_000):
        labels = ids[torch.randint(0, 50_000, (n,), generator=gen)].reshape(-1, 1)
        labels[::7] = NONE
        space.block(labels, "why")
        space.mark_mixed(labels.expand(-1, 3), "how")
        want = labels[labels != NONE].unique()
        assert torch.equal(space.blocked[-1][0], want) and torch.equal(space.mixed[-1][0], want)
