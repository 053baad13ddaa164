"""TCC on hand-built tensors: crops with known redundancy give known quotas; exact k with overflow."""
import pytest
import torch

import vlprune
from vlprune.builtin_methods.base import Context, Signal
from vlprune.builtin_methods.tcc import allocate
from vlprune.registry import get_method

ATT, KEYS = Signal("cls_attention", -2), Signal("keys", -2)
# crops=4 on a 4x4 grid are the 2x2 quadrants
CROPS = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def keys_with_redundancy():
    """Quadrant 0: four equal keys (0 informative); 1: a repeated pair + 2 unique (2); 2, 3: all unique (4).

    Quadrant 3 repeats quadrant 2's keys exactly: similarity across crops must not count.
    """
    e = torch.eye(8)
    full = torch.zeros(16, 8)
    full[CROPS[0]] = e[0]
    full[[2, 3]] = e[1]
    full[6], full[7] = e[2], e[3]
    for t, u in zip(CROPS[2], range(4)):
        full[t] = e[u]
    full[CROPS[3]] = full[CROPS[2]]
    return full.view(16, 2, 4).permute(1, 0, 2).unsqueeze(0)  # (1, 2 heads, 16, 4)


def attention():
    """Head mean ranks tokens 15 > 14 > ... > 0, except token 1, lifted by head 1 alone to the top overall."""
    att = torch.arange(16.0).expand(2, -1).clone().unsqueeze(0) / 100
    att[0, 1, 1] = 0.5  # token 1: head mean 0.255 -> the top of quadrant 0
    return att


@pytest.mark.parametrize("k,quota", [(5, [0, 1, 2, 2]), (8, [0, 2, 3, 3]), (12, [0, 4, 4, 4]), (14, [2, 4, 4, 4]),
                                     (16, [4, 4, 4, 4]), (1, [0, 0, 1, 0])])
def test_known_redundancy_gives_known_quotas(k, quota):
    """Quotas follow the non-redundant counts 0:2:4:4; full quadrants pass their overflow on."""
    tokens = torch.randn(1, 16, 3)
    ctx = Context(grid=(4, 4), signals={ATT: attention(), KEYS: keys_with_redundancy()})
    sel = get_method("tcc").create().select(tokens, k, ctx)
    kept = set(sel.indices[0].tolist())
    assert len(kept) == k
    assert [len(kept & set(c)) for c in CROPS] == quota
    torch.testing.assert_close(sel.scores, attention().mean(1))
    # inside each quadrant the highest head-mean [CLS] attention wins
    scores = sel.scores[0]
    for crop, q in zip(CROPS, quota):
        assert kept & set(crop) == set(sorted(crop, key=lambda t: -scores[t].item())[:q])
    assert sel.tokens is None and sel.indices[0].tolist() == sorted(kept)


def test_threshold_decides_what_counts_as_repetition():
    e = torch.eye(8)
    full = torch.stack([e[t % 8] for t in range(16)])
    full[1] = 0.8 * e[0] + 0.6 * e[3]  # cosine 0.8 with token 0, its quadrant neighbour
    keys = full.view(16, 2, 4).permute(1, 0, 2).unsqueeze(0)
    att = torch.rand(1, 2, 16)
    ctx = Context(grid=(4, 4), signals={ATT: att, KEYS: keys})
    loose = get_method("tcc").create(threshold=0.9).select(torch.zeros(1, 16, 1), 6, ctx).indices[0].tolist()
    strict = get_method("tcc").create(threshold=0.7).select(torch.zeros(1, 16, 1), 6, ctx).indices[0].tolist()
    assert [len(set(loose) & set(c)) for c in CROPS] == [2, 2, 1, 1]  # all equal: 1.5 each, ties to lower crops
    assert [len(set(strict) & set(c)) for c in CROPS] == [1, 2, 2, 1]  # 2:4:4:4 -> 0.86, 1.71, 1.71, 1.71


def test_allocate_rounds_by_largest_remainder_and_respects_sizes():
    sizes = torch.tensor([4, 4, 4, 4])
    assert allocate(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), sizes, 6).tolist() == [[2, 2, 1, 1]]
    # no information anywhere: by size (0.5, 1.5, 3, 1 -> ties of .5 go to the lower crop)
    assert allocate(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), torch.tensor([1, 3, 6, 2]), 6).tolist() == [[1, 1, 3, 1]]
    # crop 0 overflows (8.1 > 2), then crop 2 (7 > 3); the rest goes to the zero-weight crop
    assert allocate(torch.tensor([[9.0, 0.0, 1.0]]), torch.tensor([2, 5, 3]), 9).tolist() == [[2, 4, 3]]
    assert allocate(torch.tensor([[3.0, 1.0]]), torch.tensor([10, 10]), 8).tolist() == [[6, 2]]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        c = int(torch.randint(1, 7, (1,), generator=g))
        sizes = torch.randint(1, 6, (c,), generator=g)
        w = torch.rand(4, c, generator=g) * (torch.rand(4, c, generator=g) > 0.3)
        for k in range(1, int(sizes.sum()) + 1):
            q = allocate(w, sizes, k)
            assert bool((q.sum(-1) == k).all()) and bool((q <= sizes).all()) and bool((q >= 0).all())


@pytest.mark.parametrize("grid,crops", [((4, 4), 4), ((3, 5), 4), ((1, 1), 4), ((2, 7), 3), ((3, 5), 1), ((2, 2), 9)])
def test_exactly_k_for_every_k_and_batch_equals_singles(grid, crops):
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, n, 5, generator=g)
    sig = {ATT: torch.rand(3, 2, n, generator=g), KEYS: torch.randn(3, 2, n, 2, generator=g)}
    m = get_method("tcc").create(crops=crops, threshold=0.5)
    for k in range(1, n + 1):
        sel = m.select(tokens, k, Context(grid=grid, signals=sig))
        assert sel.indices.shape == (3, k)
        for i in range(3):
            assert sel.indices[i].tolist() == sorted(set(sel.indices[i].tolist()))
            one = m.select(tokens[i : i + 1], k, Context(grid=grid, signals={s: v[i : i + 1] for s, v in sig.items()}))
            assert torch.equal(one.indices[0], sel.indices[i])


@pytest.mark.parametrize("options,needle", [
    ({"crops": 0}, "crops"), ({"crops": 2.0}, "int >= 1"), ({"threshold": 1.5}, "[-1, 1]"),
    ({"threshold": "high"}, "threshold"), ({"layer": None}, "layer"), ({"density": 0.5}, "allowed: crops"),
])
def test_bad_options(options, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("tcc").create(**options)
    assert needle in str(err.value)


def test_batch_equals_singles_bit_for_bit_at_llava_size():
    """24x24 patches, 16 heads: sizes where a batched matrix product can sum in another order."""
    g = torch.Generator().manual_seed(2)
    n, b = 576, 3
    tokens = torch.randn(b, n, 64, generator=g)
    sig = {ATT: torch.softmax(3 * torch.randn(b, 16, n, generator=g), -1), KEYS: torch.randn(b, 16, n, 64, generator=g)}
    m = get_method("tcc").create()
    for k in (1, 64, 144, 575):
        sel = m.select(tokens, k, Context(grid=(24, 24), signals=sig))
        for i in range(b):
            single = {s: v[i : i + 1] for s, v in sig.items()}
            one = m.select(tokens[i : i + 1], k, Context(grid=(24, 24), signals=single))
            assert torch.equal(one.indices[0], sel.indices[i])
            if sel.tokens is not None:
                assert torch.equal(one.tokens[0], sel.tokens[i]) and torch.equal(one.sources[0], sel.sources[i])
