"""VTC-CLS on hand-built tensors: the layer sum ranks differently from every single layer."""
import pytest
import torch

import vlprune
from vlprune.builtin_methods.base import Context, Signal
from vlprune.registry import get_method


def cls(layer):
    return Signal("cls_attention", layer)


def planted(n=8):
    """Layers -4, -3, -2 each crown a different token; token 6 is second in all three and wins the sum.

    Head means (background 0.01): layer -4: t0 0.50, layer -3: t1 0.45, layer -2: t2 0.40, t6 0.30 in each.
    Sums: t6 0.90, t0 0.52, t1 0.47, t2 0.42. Layers -5 and -1 (outside the range) crown t7 and t5.
    """
    rows = {layer: torch.full((1, 2, n), 0.01) for layer in (-5, -4, -3, -2, -1)}
    rows[-4][0, :, 0] = 0.50
    rows[-3][0, 0, 1], rows[-3][0, 1, 1] = 0.80, 0.10  # head mean 0.45: only the head mean counts
    rows[-2][0, :, 2] = 0.40
    for layer in (-4, -3, -2):
        rows[layer][0, 0, 6], rows[layer][0, 1, 6] = 0.35, 0.25  # head mean 0.30
    rows[-5][0, :, 7] = 5.0
    rows[-1][0, :, 5] = 5.0
    return {cls(layer): row for layer, row in rows.items()}


def test_defaults_request_the_three_layers_ending_at_the_penultimate():
    m = get_method("vtc_cls").create()
    assert (m.start_layer, m.end_layer, m.stage) == (-4, -2, "encoder")
    assert m.signals() == [cls(-4), cls(-3), cls(-2)]  # layers 20, 21, 22 of a 24-layer CLIP
    assert get_method("vtc_cls").create(start_layer=16, end_layer=22).signals() == [cls(i) for i in range(16, 23)]


def test_sum_over_layers_ranks_differently_from_any_single_layer():
    sig = planted()
    m = get_method("vtc_cls").create()
    sel = m.select(torch.zeros(1, 8, 4), 1, Context(grid=(2, 4), signals=sig))
    assert sel.indices.tolist() == [[6]]  # first in no single layer
    for layer in (-4, -3, -2):  # each single layer ranks another token first
        assert int(sig[cls(layer)].mean(1).argmax()) != 6
    sel = m.select(torch.zeros(1, 8, 4), 3, Context(grid=(2, 4), signals=sig))
    assert sel.indices.tolist() == [[0, 1, 6]]  # raster order, layers -5 and -1 ignored
    want = sum(sig[cls(layer)].mean(1) for layer in (-4, -3, -2))
    torch.testing.assert_close(sel.scores, want)


def test_single_layer_range_equals_fastervlm_and_batches_split():
    g = torch.Generator().manual_seed(0)
    sig = {cls(-2): torch.rand(3, 4, 16, generator=g)}
    tokens = torch.zeros(3, 16, 2)
    a = get_method("vtc_cls").create(start_layer=-2, end_layer=-2).select(tokens, 5, Context((4, 4), sig))
    b = get_method("fastervlm").create().select(tokens, 5, Context((4, 4), sig))
    assert torch.equal(a.indices, b.indices)
    sig = {cls(layer): torch.rand(3, 4, 16, generator=g) for layer in (-4, -3, -2)}
    m = get_method("vtc_cls").create()
    both = m.select(tokens, 7, Context((4, 4), sig)).indices
    for i in range(3):
        one = m.select(tokens[i:i + 1], 7, Context((4, 4), {s: v[i:i + 1] for s, v in sig.items()})).indices
        assert torch.equal(one[0], both[i])


@pytest.mark.parametrize("options,needle", [
    ({"start_layer": -2, "end_layer": -4}, "start_layer=-2 must be <= end_layer=-4"),
    ({"start_layer": 5, "end_layer": 3}, "start_layer=5 must be <= end_layer=3"),
    ({"start_layer": 20, "end_layer": -2}, "both negative"),
    ({"start_layer": -4, "end_layer": 2}, "both negative"),
    ({"start_layer": 2.0}, "start_layer must be an int"),
    ({"end_layer": True}, "end_layer must be an int"),
])
def test_bad_layer_ranges(options, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("vtc_cls").create(**options)
    assert needle in str(err.value)
