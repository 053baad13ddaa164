"""Core layer on plain tensors: budgets, registry errors, signals, selection helpers, method formulas."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vlprune
from vlprune import signals
from vlprune.budget import Budget
from vlprune.builtin_methods.base import Context, Signal
from vlprune.registry import get_method
from vlprune.select import grid_cells, topk_indices
from vlprune.sequence import compact, keep_mask, placeholder_positions


def test_methods_listing():
    listed = vlprune.methods()
    assert {"fastervlm", "random", "uniform", "pool"} <= set(listed)
    assert all(isinstance(s, str) and s for s in listed.values())
    # the subpackage stays importable although it is also the callable vlprune.methods()
    from vlprune.builtin_methods import fastervlm

    assert fastervlm.FasterVLM.name == "fastervlm"


@pytest.mark.parametrize("ratio,n,k", [(0.889, 576, 64), (0.9, 576, 58), (0.95, 576, 29), (0.75, 576, 144),
                                        (0.5, 576, 288), (0.0, 576, 576), (0.5, 16, 8)])
def test_ratio_to_tokens(ratio, n, k):
    assert Budget(ratio=ratio).tokens_for(n) == k


def test_keep_is_per_image_and_identity_above_n():
    assert Budget(keep=64).tokens_for(576) == 64
    assert Budget(keep=1000).tokens_for(576) == 576


@pytest.mark.parametrize("kwargs,needle", [
    ({}, "exactly one of ratio"), ({"ratio": 0.5, "keep": 3}, "exactly one of ratio"),
    ({"ratio": 1.0}, "ratio must be in [0, 1)"), ({"ratio": -0.1}, "ratio must be in [0, 1)"),
    ({"ratio": float("nan")}, "ratio must be a number"), ({"ratio": "0.5"}, "ratio must be a number"),
    ({"keep": 0}, "keep must be >= 1"), ({"keep": 2.5}, "keep must be an int"), ({"keep": True}, "keep must be an int"),
])
def test_budget_errors(kwargs, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        Budget(**kwargs)
    assert needle in str(err.value)


def test_ratio_that_keeps_nothing_is_an_error_not_a_clamp():
    with pytest.raises(vlprune.VlpruneError, match="keeps no token"):
        Budget(ratio=0.99).tokens_for(16)


def test_unknown_method_suggests_nearest():
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("fastervl")
    assert "Did you mean 'fastervlm'" in str(err.value) and "uniform" in str(err.value)


def test_unknown_option_lists_allowed():
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method("fastervlm").create(layr=3)
    assert "layr" in str(err.value) and "layer" in str(err.value)


def test_duplicate_registration_rejected():
    with pytest.raises(vlprune.VlpruneError, match="already registered"):
        vlprune.register_method("fastervlm")(type("Other", (vlprune.Method,), {}))


def test_cls_attention_equals_full_softmax_row():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.35, dim=-1)
    torch.testing.assert_close(signals.cls_attention(q, k, 0.35), full[:, :, 0])
    torch.testing.assert_close(signals.cls_attention(q, k, 0.35, query_index=4), full[:, :, 4])


def test_attention_received_equals_full_column_mean():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.35, dim=-1)
    torch.testing.assert_close(signals.attention_received(q, k, 0.35, chunk=3), full.mean(dim=-2))


def test_topk_is_raster_ordered():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [5, 4, 3, 2, 1.0]])
    assert topk_indices(scores, 2).tolist() == [[1, 3], [0, 1]]


@pytest.mark.parametrize("h,w,k", [(4, 4, 4), (24, 24, 64), (24, 24, 58), (24, 24, 29), (24, 24, 1), (5, 3, 15), (3, 7, 5)])
def test_grid_cells_partition_exactly_k(h, w, k):
    cells = grid_cells(h, w, k)
    assert len(cells) == k
    cover = torch.zeros(h, w, dtype=torch.int)
    for r0, r1, c0, c1 in cells:
        assert r1 > r0 and c1 > c0
        cover[r0:r1, c0:c1] += 1
    assert bool((cover == 1).all()), "cells must tile the grid exactly once"


def test_fastervlm_formula_hand_built():
    """Head-mean of the [CLS] row decides; a token strong in one head only loses to one strong in all."""
    n = 9
    row = torch.full((1, 2, n), 0.01)
    row[0, :, 4] = 0.30          # strong in both heads: mean 0.30
    row[0, 0, 7] = 0.50          # strong in head 0 only: mean 0.255
    row[0, 1, 2] = 0.40          # head 1 only: mean 0.205
    row[0, 0, 0] = 0.35          # head 0 only: mean 0.18
    method = get_method("fastervlm").create()
    sel = method.select(torch.zeros(1, n, 4), 3, Context(grid=(3, 3), signals={Signal("cls_attention", -2): row}))
    assert sel.indices.tolist() == [[2, 4, 7]]  # top-3 by head mean, ascending order
    torch.testing.assert_close(sel.scores, row.mean(1))


def test_random_is_seeded_unique_and_batch_invariant():
    tokens = torch.zeros(3, 50, 2)
    m0, m1 = get_method("random").create(seed=0), get_method("random").create(seed=1)
    a, b, c = (m.select(tokens, 10, Context(grid=(5, 10))).indices for m in (m0, m0, m1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(m0.select(tokens[:1], 10, Context(grid=(5, 10))).indices[0], a[2])
    assert len(set(a[0].tolist())) == 10


def test_uniform_known_layout():
    sel = get_method("uniform").create().select(torch.zeros(2, 16, 1), 4, Context(grid=(4, 4)))
    assert sel.indices.tolist() == [[0, 2, 8, 10]] * 2
    sel = get_method("uniform").create().select(torch.zeros(1, 576, 1), 64, Context(grid=(24, 24)))
    rows, cols = sel.indices[0] // 24, sel.indices[0] % 24
    assert sorted(set(rows.tolist())) == list(range(1, 24, 3)) and sorted(set(cols.tolist())) == list(range(1, 24, 3))


def test_pool_equals_adaptive_avg_pool_on_square_budgets():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 36, 5, generator=g)
    sel = get_method("pool").create().select(tokens, 9, Context(grid=(6, 6)))
    ref = F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(2, 5, 6, 6), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(sel.tokens, ref)


def test_pool_any_k_preserves_the_mean():
    tokens = torch.randn(1, 576, 3)
    sel = get_method("pool").create().select(tokens, 58, Context(grid=(24, 24)))
    assert sel.tokens.shape == (1, 58, 3)
    # each cell is an average, and the cells tile the grid: the area-weighted mean is the global mean
    areas = torch.tensor([(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in grid_cells(24, 24, 58)], dtype=torch.float)
    torch.testing.assert_close((sel.tokens[0] * areas[:, None]).sum(0) / 576, tokens[0].mean(0), atol=1e-5, rtol=1e-5)


def test_compaction_equal_rows_and_repadding():
    ids = torch.tensor([[0, 1, 5, 5, 5, 2], [3, 5, 5, 5, 4, 6]])
    image = ids == 5
    blocks = placeholder_positions(image, 3)
    keep = keep_mask(image, blocks, [torch.tensor([0, 2]), torch.tensor([1])])
    out = compact(keep, {"ids": (ids, -1)}, right_padded=False)
    # row 0 keeps 5 positions, row 1 keeps 4: row 1 is left-padded by one
    assert out["ids"].tolist() == [[0, 1, 5, 5, 2], [-1, 3, 5, 4, 6]]
    out = compact(keep, {"ids": (ids, -1)}, right_padded=True)
    assert out["ids"].tolist() == [[0, 1, 5, 5, 2], [3, 5, 4, 6, -1]]


def test_placeholder_mismatch_is_clear():
    with pytest.raises(vlprune.VlpruneError, match="image features and placeholders do not match"):
        placeholder_positions(torch.tensor([[True] * 5]), 4)


OPTIONS = [pytest.param(name, f.name, id=f"{name}-{f.name}") for name in sorted(vlprune.methods())
           for f in dataclasses.fields(get_method(name))]


@pytest.mark.parametrize("method,option", OPTIONS)
def test_every_option_is_type_checked_at_create_with_its_name(method, option):
    """A value of no accepted type fails when the method is created (at ``patch()``), naming the option,
    never as a bare TypeError at the first call."""
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method(method).create(**{option: object()})
    assert option in str(err.value)


@pytest.mark.parametrize("method,option,value", [("random", "seed", "x"), ("visual_exit", "threshold", "hi"),
                                                 ("fastervlm", "layer", True), ("tcc", "crops", 2.0)])
def test_wrong_types_users_meet(method, option, value):
    with pytest.raises(vlprune.VlpruneError) as err:
        get_method(method).create(**{option: value})
    assert f"{option}={value!r}" in str(err.value)


def test_divprune_never_picks_a_token_twice_on_non_finite_features():
    tokens = torch.randn(2, 16, 8)
    tokens[0, 3] = float("nan")
    tokens[1] = float("inf")
    sel = get_method("divprune").create().select(tokens, 6, Context(grid=(4, 4)))
    assert all(len(set(row.tolist())) == 6 for row in sel.indices)


# -- the public API without a model ---------------------------------------------------------------
def test_method_classes_are_exported_and_methods_stays_callable():
    assert vlprune.methods.FasterVLM is get_method("fastervlm")
    assert vlprune.methods.PruMergePlus is get_method("prumerge_plus")
    assert "FasterVLM" in dir(vlprune.methods) and "KeepAll" not in dir(vlprune.methods)  # registered only
    with pytest.raises(AttributeError, match="no method class .KeepAll.; registered: ATP, DAMRO"):
        vlprune.methods.KeepAll
    assert vlprune.methods()["fastervlm"] == get_method("fastervlm").summary
    assert "unpatch" in vlprune.__all__ and vlprune.unpatch is vlprune.api.unpatch


def test_method_object_options_are_validated_like_keywords():
    """The object's options pass the same checks as keywords (create + check_types), before any model lookup."""
    model = torch.nn.Linear(2, 2)  # no patcher: validation must fail first
    with pytest.raises(vlprune.VlpruneError) as by_name:
        vlprune.patch(model, "fastervlm", keep=4, layer="x")
    with pytest.raises(vlprune.VlpruneError) as by_object:
        vlprune.patch(model, vlprune.methods.FasterVLM(layer="x"), keep=4)
    assert str(by_object.value) == str(by_name.value) and "layer='x'" in str(by_name.value)
    with pytest.raises(vlprune.VlpruneError, match="ratio must be in"):
        vlprune.patch(model, vlprune.methods.FasterVLM(), ratio=1.5)


@pytest.mark.parametrize("method,kwargs,needle", [
    (lambda: vlprune.methods.FasterVLM(layer=-3), {"keep": 4, "layer": -2}, "both in the method object"),
    (lambda: vlprune.methods.Random(), {"keep": 4, "seed": 1}, "as keyword arguments (seed)"),
    (lambda: vlprune.methods.FasterVLM, {"keep": 4}, "not the class FasterVLM"),
    (lambda: 3, {"keep": 4}, "method must be a method name"),
    (lambda: type("Mine", (vlprune.methods.FasterVLM,), {})(), {"keep": 4}, "not a registered method"),
])
def test_method_object_misuse_is_a_clear_error(method, kwargs, needle):
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.patch(torch.nn.Linear(2, 2), method(), **kwargs)
    assert needle in str(err.value)


def test_unpatch_of_an_unpatched_model_is_a_no_op():
    model = torch.nn.Linear(2, 2)
    assert vlprune.unpatch(model) is False and "_vlprune" not in model.__dict__


def test_image_record_repr_is_short():
    rec = vlprune.ImageRecord(row=0, before=576, after=64, kept=torch.arange(3, 3 + 128, 2),
                              scores=torch.rand(576), sources=torch.rand(64, 576))
    assert repr(rec) == "ImageRecord(row=0, before=576, after=64, kept=[3, 5, 7, ...], scores=576 values, sources=64x576)"
    small = vlprune.ImageRecord(row=1, before=4, after=2, kept=torch.tensor([1, 3]))
    assert repr([small]) == "[ImageRecord(row=1, before=4, after=2, kept=[1, 3])]"  # empty optional fields left out
    from vlprune.patches.llava_next_hf import NextImageRecord

    nxt = NextImageRecord(row=0, before=20, after=2, kept=torch.tensor([0, 9]), grids=((2, 2), (4, 4)), newlines=4)
    assert repr(nxt) == "NextImageRecord(row=0, before=20, after=2, kept=[0, 9], grids=((2, 2), (4, 4)), newlines=4)"


# -- support follows from capabilities, never from a method's name ------------------------------------
def test_support_is_derived_from_what_a_method_asks_and_a_family_provides():
    """A family is judged on a method's stage, signal kinds and merging: a method unknown to every patcher
    gets a verdict (and a refusal names what is missing), with no table to update."""
    from dataclasses import dataclass

    from vlprune.builtin_methods.base import Method, Signal
    from vlprune.patcher import Patcher

    class Family(Patcher):
        provides = {"encoder": "yes", "keys": "yes", "cls_attention": "substitute: a stand-in row",
                    "merges": "substitute: merges merged tokens", "encoder/values": "no: values are fused away"}

    def verdict(kinds, stage="encoder", merges=False):
        @dataclass
        class Custom(Method):
            def signals(self):
                return [Signal(k, -2) for k in kinds]

        Custom.stage, Custom.merges = stage, merges
        return Family.support(Custom)

    assert verdict(("keys",)) == "yes"
    assert verdict(("keys", "cls_attention"), merges=True) == "substitute: a stand-in row; merges merged tokens"
    assert verdict(("values",)) == "no: values are fused away"
    assert verdict(("attention_received",)) == "no: Family does not provide the attention_received signal"
    assert verdict(("keys",), stage="llm") == "no: Family does not provide stage 'llm'"
