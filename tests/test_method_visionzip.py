"""VisionZip on hand-built tensors: planted dominant tokens, a known contextual assignment."""
import pytest
import torch

import vlprune
from vlprune.builtin_methods.base import Context, Signal
from vlprune.registry import get_method

ATT, KEYS = Signal("cls_attention", -2), Signal("keys", -2)


def by_index(sel, i=0):
    """(indices, tokens, sources) of image i, sorted by index (the order the core puts them in)."""
    order = sel.indices[i].argsort()
    return sel.indices[i][order], sel.tokens[i][order], sel.sources[i][order]


def test_split_defaults_to_the_readme_54_plus_10():
    m = get_method("visionzip").create()
    assert m.split(64) == (54, 10)
    assert m.split(4) == (3, 1) and m.split(8) == (7, 1) and m.split(1) == (1, 0)
    assert get_method("visionzip").create(contextual_ratio=0.5).split(2) == (1, 1)
    assert get_method("visionzip").create(contextual_ratio=0.9).split(3) == (1, 2)  # at least one dominant


def planted(n=16):
    """Dominant 5 and 9 (by head sum; 5 is strong in one head only); targets 0 and 8; members split by key."""
    att = torch.full((1, 2, n), 0.01)
    att[0, 0, 5] = 0.9   # sum 0.91
    att[0, :, 9] = 0.3   # sum 0.60
    att[0, 1, 12] = 0.4  # sum 0.41: third, not dominant at k=4 with 2 contextual
    keys = torch.zeros(1, 2, n, 3)
    e0, e1, e2 = torch.eye(3)
    group_a, group_b = [1, 2, 3, 4, 6, 7], [10, 11, 12, 13, 14, 15]
    for t in [0] + group_a:
        keys[0, :, t] = e0
    for t in [8] + group_b:
        keys[0, :, t] = e1
    keys[0, 0, 3], keys[0, 1, 3] = e1, 3 * e0  # looks like target 8 in head 0, but the head mean is 0's
    keys[0, :, 5] = keys[0, :, 9] = e2
    return att, keys, group_a, group_b


def test_dominant_and_contextual_formula():
    att, keys, group_a, group_b = planted()
    tokens = torch.randn(1, 16, 6, generator=torch.Generator().manual_seed(0))
    m = get_method("visionzip").create(contextual_ratio=0.5)
    sel = m.select(tokens, 4, Context(grid=(4, 4), signals={ATT: att, KEYS: keys}))
    idx, out, src = by_index(sel)
    # dominant: 5, 9 by head *sum*; rest = 14 tokens, stride 14 // 2 = 7 -> targets rest[0] = 0, rest[7] = 8
    assert idx.tolist() == [0, 5, 8, 9]
    torch.testing.assert_close(sel.scores, att.sum(1))
    x = tokens[0]
    torch.testing.assert_close(out[1], x[5])
    torch.testing.assert_close(out[3], x[9])
    torch.testing.assert_close(out[0], x[0] + x[group_a].mean(0))
    torch.testing.assert_close(out[2], x[8] + x[group_b].mean(0))
    want = torch.zeros(4, 16)
    want[1, 5] = want[3, 9] = 1.0
    want[0, 0], want[0, group_a] = 1.0, 1 / len(group_a)
    want[2, 8], want[2, group_b] = 1.0, 1 / len(group_b)
    torch.testing.assert_close(src, want)


def test_target_without_members_is_itself():
    att, keys, group_a, group_b = planted()
    keys[0, :, group_a] = torch.eye(3)[1]  # everyone now prefers target 8
    tokens = torch.randn(1, 16, 6)
    sel = get_method("visionzip").create(contextual_ratio=0.5).select(
        tokens, 4, Context(grid=(4, 4), signals={ATT: att, KEYS: keys}))
    idx, out, src = by_index(sel)
    assert idx.tolist() == [0, 5, 8, 9]
    assert torch.equal(out[0], tokens[0, 0])
    assert src[0].nonzero().flatten().tolist() == [0]
    torch.testing.assert_close(out[2], tokens[0, 8] + tokens[0, group_a + group_b].mean(0))


def test_zero_contextual_is_top_k_by_head_sum():
    att, keys, _, _ = planted()
    tokens = torch.randn(1, 16, 6)
    sel = get_method("visionzip").create(contextual_ratio=0.0).select(
        tokens, 3, Context(grid=(4, 4), signals={ATT: att, KEYS: keys}))
    idx, out, src = by_index(sel)
    assert idx.tolist() == [5, 9, 12]
    assert torch.equal(out, tokens[0, [5, 9, 12]])
    assert torch.equal(src, torch.eye(16)[[5, 9, 12]])


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 1), (2, 7)])
def test_exactly_k_for_every_k_and_batch_equals_singles(grid):
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, n, 5, generator=g)
    sig = {ATT: torch.rand(3, 2, n, generator=g), KEYS: torch.randn(3, 2, n, 4, generator=g)}
    m = get_method("visionzip").create(contextual_ratio=0.3)
    for k in range(1, n + 1):
        sel = m.select(tokens, k, Context(grid=grid, signals=sig))
        assert sel.indices.shape == (3, k) and sel.tokens.shape == (3, k, 5) and sel.sources.shape == (3, k, n)
        for i in range(3):
            assert len(set(sel.indices[i].tolist())) == k
            one = m.select(tokens[i : i + 1], k, Context(grid=grid, signals={s: v[i : i + 1] for s, v in sig.items()}))
            assert torch.equal(one.indices[0], sel.indices[i]) and torch.equal(one.tokens[0], sel.tokens[i])
        torch.testing.assert_close(torch.bmm(sel.sources, tokens), sel.tokens)
        assert bool((sel.sources.gather(-1, sel.indices.unsqueeze(-1)) > 0).all())


@pytest.mark.parametrize("options,needle", [
    ({"contextual_ratio": 1.0}, "contextual_ratio"), ({"contextual_ratio": -0.1}, "contextual_ratio"),
    ({"contextual_ratio": "a"}, "[0, 1)"), ({"layer": 1.5}, "layer"), ({"dominant": 54}, "allowed: contextual_ratio"),
])
def test_bad_options(options, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("visionzip").create(**options)
    assert needle in str(err.value)


def test_batch_equals_singles_bit_for_bit_at_llava_size():
    """24x24 patches, 16 heads: sizes where a batched matrix product can sum in another order."""
    g = torch.Generator().manual_seed(2)
    n, b = 576, 3
    tokens = torch.randn(b, n, 64, generator=g)
    sig = {ATT: torch.softmax(3 * torch.randn(b, 16, n, generator=g), -1), KEYS: torch.randn(b, 16, n, 64, generator=g)}
    m = get_method("visionzip").create()
    for k in (1, 64, 144, 575):
        sel = m.select(tokens, k, Context(grid=(24, 24), signals=sig))
        for i in range(b):
            single = {s: v[i : i + 1] for s, v in sig.items()}
            one = m.select(tokens[i : i + 1], k, Context(grid=(24, 24), signals=single))
            assert torch.equal(one.indices[0], sel.indices[i])
            if sel.tokens is not None:
                assert torch.equal(one.tokens[0], sel.tokens[i]) and torch.equal(one.sources[0], sel.sources[i])
