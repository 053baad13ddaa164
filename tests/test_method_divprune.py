"""DivPrune on hand-built point sets whose farthest-point order is known."""
import math

import pytest
import torch

from vlprune.builtin_methods.base import Context
from vlprune.builtin_methods.divprune import cosine_distances, farthest_points
from vlprune.registry import get_method


def circle(degrees, norms=None):
    """2-D tokens at the given angles (cosine distance is monotone in the angle between them)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    pts = torch.stack([rad.cos(), rad.sin()], dim=-1).float()
    if norms is not None:
        pts = pts * torch.tensor(norms).unsqueeze(-1)
    return pts.unsqueeze(0)


# a tight cluster at 0/5/10 degrees and outliers at 180, 90, 250. Nearest-neighbour angles:
# 5, 5, 5, 70, 80, 70 -> first pick 4 (90 deg). Then the largest min angle to the kept set:
# 5 (160), 0 (90), 3 (70), 2 (10), 1 (5).
ANGLES = [0, 5, 10, 180, 90, 250]
ORDER = [4, 5, 0, 3, 2, 1]


def test_farthest_point_order_on_a_circle():
    tokens = circle(ANGLES, norms=[1.0, 3.0, 0.5, 2.0, 7.0, 0.1])  # cosine: lengths do not matter
    order, radii = farthest_points(cosine_distances(tokens), 6)
    assert order[0].tolist() == ORDER
    m = get_method("divprune").create()
    assert m.stage == "projector" and m.signals() == []
    for k in range(1, 7):
        sel = m.select(tokens, k, Context(grid=(2, 3)))
        assert sel.indices[0].tolist() == sorted(ORDER[:k])
        # the kept tokens hold the k largest radii (distance to what was kept before them)
        assert set(sel.scores[0].topk(k).indices.tolist()) == set(ORDER[:k])
    # radii of picks 2.. are 1 - cos(angle gained): 160, 90, 70, 10, 5 degrees
    want = [1 - math.cos(math.radians(a)) for a in (160, 90, 70, 10, 5)]
    torch.testing.assert_close(radii[0, ORDER[1:]], torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert radii[0, ORDER[0]] == 2.0


def test_cluster_plus_outliers_keeps_the_outliers_first():
    g = torch.Generator().manual_seed(0)
    cluster = torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(12, 4, generator=g)
    outliers = torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    tokens = torch.cat([cluster[:5], outliers[:1], cluster[5:9], outliers[1:], cluster[9:]]).unsqueeze(0)
    sel = get_method("divprune").create().select(tokens, 4, Context(grid=(3, 5)))
    kept = sel.indices[0].tolist()
    assert {5, 10, 11} <= set(kept) and len(kept) == 4  # the three outliers plus one cluster member


def test_duplicates_tie_to_lowest_index_and_are_never_picked_twice():
    tokens = torch.ones(2, 9, 3)  # all distances zero
    sel = get_method("divprune").create().select(tokens, 5, Context(grid=(3, 3)))
    assert sel.indices.tolist() == [[0, 1, 2, 3, 4]] * 2
    tokens = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]).unsqueeze(0)
    sel = get_method("divprune").create().select(tokens, 4, Context(grid=(2, 3)))
    assert sel.indices[0].tolist() == [0, 1, 2, 3]  # two distinct directions, then duplicates by index


def naive(tokens, k):
    """Plain per-image reference: full distance matrix, Python loop over candidates."""
    out = []
    for x in tokens:
        u = x / x.norm(dim=-1, keepdim=True)
        d = (1 - u @ u.T).clamp(0, 2)
        n = len(x)
        nn = [min(float(d[i, j]) for j in range(n) if j != i) for i in range(n)]
        kept = [max(range(n), key=lambda i: (nn[i], -i))]
        while len(kept) < k:
            rest = [i for i in range(n) if i not in kept]
            kept.append(max(rest, key=lambda i: (min(float(d[i, j]) for j in kept), -i)))
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("k", [1, 3, 8, 19, 20])
def test_batched_matches_a_naive_loop_and_single_images(k):
    g = torch.Generator().manual_seed(k)
    tokens = torch.randn(3, 20, 6, generator=g)
    m = get_method("divprune").create()
    both = m.select(tokens, k, Context(grid=(4, 5))).indices
    assert both.tolist() == naive(tokens, k)
    for i in range(3):
        assert torch.equal(m.select(tokens[i:i + 1], k, Context(grid=(4, 5))).indices[0], both[i])


def test_bf16_tokens_are_compared_in_float32():
    tokens = circle(ANGLES).to(torch.bfloat16)
    sel = get_method("divprune").create().select(tokens, 3, Context(grid=(2, 3)))
    assert sel.indices[0].tolist() == sorted(ORDER[:3]) and sel.scores.dtype == torch.float32


def test_batch_equals_singles_bit_for_bit_at_llava_size():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(3, 576, 64, generator=g)
    m = get_method("divprune").create()
    for k in (1, 64, 144, 575):
        sel = m.select(tokens, k, Context(grid=(24, 24)))
        for i in range(3):
            one = m.select(tokens[i:i + 1], k, Context(grid=(24, 24)))
            assert torch.equal(one.indices[0], sel.indices[i]) and torch.equal(one.scores[0], sel.scores[i])
