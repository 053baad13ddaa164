"""damro on LLaVA-NeXT (AnyRes) and on the original LLaVA code (llava-torch), beside HF LLaVA-1.5
(test_method_damro.py). Per family: alpha 0 is the unpatched generation bit for bit, the captured
logits are DAMRO's formula on the full and the outlier-only pass recomputed here without the patch
(alone and composed with a pruning method), the outliers are the top-k of an eager-attention [CLS] row,
cache and batches agree, and disabled()/remove() restore the model.

The independent outlier-only pass is laid out by hand, as each family's patcher documents it: NeXT -
the image's outlier tokens only, base view first then high-res raster order, no newline tokens; the
original code - the outlier features spliced in place of the image's placeholder.
"""
import pytest
import torch
from families import LlavaNext, LlavaOriginal
from test_contract import hook_state, no_hooks_left
from tiny import IMAGE_TOKEN, fail_if_left_patched

import vlprune

PRUNE = {"prune": "fastervlm", "ratio": 0.5}


class Next(LlavaNext):
    side = 4  # 56 px views, 14 px patches (test_llava_next_hf)

    def contrasted(self, inp, steps):
        """(new ids, raw logits per step) of greedy generate."""
        with torch.inference_mode():
            out = self.model.generate(**inp, do_sample=False, max_new_tokens=steps, return_dict_in_generate=True,
                                      output_logits=True)
        return out.sequences[:, inp["input_ids"].shape[1]:], out.logits

    def cls_scores(self, inp):
        """The eager [CLS] row at layer -2 of each view (head mean), over the image's visual tokens: the base
        view's, then the crops' rows stitched into the high-res grid and unpadded by transformers' own code."""
        from test_llava_next_hf import PINPOINTS
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        size, s = inp["image_sizes"][0].tolist(), self.side
        rows, cols = get_anyres_image_grid_shape(size, PINPOINTS, 56)
        att = _eager_cls(self.model.model.vision_tower, inp["pixel_values"][0, : 1 + rows * cols])
        high = att[1:].view(rows, cols, s, s).permute(0, 2, 1, 3).reshape(1, rows * s, cols * s)
        return torch.cat([att[0], unpad_image(high, size)[0].flatten()])

    def independent(self, inp, new, record, pruned):
        """Last-position logits, without the patch, of the one-image prompt ``inp`` followed by ``new``: with
        the image as the (pruned) model feeds it, and as its outliers only (no newlines)."""
        model = self.model
        ids = inp["input_ids"][0]
        (s, _), (_h, w) = record.grids
        base = s * s
        with torch.inference_mode():
            packed = model.model.get_image_features(pixel_values=inp["pixel_values"], image_sizes=inp["image_sizes"],
                                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                                    return_dict=True).pooler_output[0]

        def offsets(idx, newlines=False):
            idx = idx.cpu()
            high = idx[idx >= base] - base
            parts = [idx[idx < base], base + high // w * (w + 1) + high % w]
            if newlines:  # the newline closing every high-res row that keeps a token
                parts.append(base + (high // w).unique() * (w + 1) + w)
            return torch.cat(parts).sort().values

        def last_logits(features):
            image = (ids == IMAGE_TOKEN).nonzero().flatten()
            short = torch.cat([ids[: image[0]], ids[image[0]: image[0] + len(features)], ids[image[-1] + 1:], new])
            with torch.inference_mode():
                embeds = model.get_input_embeddings()(short).clone()
                embeds[image[0]: image[0] + len(features)] = features
                return model(inputs_embeds=embeds[None]).logits[0, -1]

        if pruned:
            full = last_logits(packed[offsets(record.kept, newlines=True)])
        else:
            with torch.inference_mode():
                full = model(**{**inp, "input_ids": torch.cat([ids, new])[None],
                                "attention_mask": torch.ones_like(torch.cat([ids, new]))[None]}).logits[0, -1]
        return full, last_logits(packed[offsets(record.outliers)])


class Original(LlavaOriginal):
    def contrasted(self, inp, steps):
        with torch.inference_mode():
            out = self.model.generate(inp["input_ids"], images=inp["images"], attention_mask=inp["attention_mask"],
                                      do_sample=False, max_new_tokens=steps, return_dict_in_generate=True,
                                      output_logits=True)
        return out.sequences, out.logits  # the original generate returns the new ids only

    def cls_scores(self, inp):
        return _eager_cls(self.model.get_vision_tower().vision_tower, inp["images"])[0]

    def independent(self, inp, new, record, pruned):
        """As the unpatched original code splices it: text embeddings around the placeholder, which holds
        the projected layer -2 features of the kept tokens (all without pruning), or of the outliers."""
        import tiny_original as to

        model = self.model
        ids = inp["input_ids"][0]
        mark = int((ids == to.IMAGE_INDEX).nonzero())
        with torch.inference_mode():
            feats = model.model.mm_projector(model.get_vision_tower()(inp["images"]))[0]

            def last_logits(features):
                embed = model.model.embed_tokens
                embeds = torch.cat([embed(ids[:mark]), features, embed(ids[mark + 1:]), embed(new)])
                return model(inputs_embeds=embeds[None]).logits[0, -1]

            return last_logits(feats[record.kept]), last_logits(feats[record.outliers])


def _eager_cls(tower, pixel_values, layer=-2):
    """Head-mean [CLS] attention rows (views, N) of ``layer`` from an eager-attention run of the tower."""
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return tower(pixel_values, output_attentions=True).attentions[layer][:, :, 0, 1:].mean(1)
    finally:
        tower.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def next_family(tmp_path_factory):
    from test_llava_next_hf import build, load

    return Next(load(build(tmp_path_factory.mktemp("damro-next"))))


@pytest.fixture(scope="module")
def original_family(tmp_path_factory):
    pytest.importorskip("llava", reason="the original LLaVA code (llava-torch) is not installed")
    import tiny_original as to

    return Original(to.load(to.build(tmp_path_factory.mktemp("damro-original"))))


@pytest.fixture(params=["next", "original"])
def family(request):
    fam = request.getfixturevalue(f"{request.param}_family")
    yield fam
    fail_if_left_patched(fam.model)


def test_support_tables_serve_damro():
    from vlprune.patches import llava_next_hf, llava_original
    from vlprune.registry import get_method

    damro = get_method("damro")
    assert llava_original.LlavaOriginal.support(damro) == "yes"  # LLaVA-1.5 shapes, as the reference
    assert llava_next_hf.LlavaNextHF.support(damro).startswith("substitute: AnyRes")  # our rule across views


def test_alpha_zero_is_the_unpatched_generation(family):
    inp = family.pair()  # two prompts of different lengths: left padding
    ref = family.reference_generate(inp)
    with vlprune.pruned(family.model, "damro", alpha=0.0) as h:
        assert torch.equal(family.generate(inp), ref)
        assert not hasattr(h._patcher, "contrast_taps")  # no outlier pass at all


@pytest.mark.parametrize("budget", [{}, PRUNE], ids=["all-tokens", "fastervlm"])
def test_combined_logits_are_the_formula_on_two_independent_passes(family, budget):
    """generate's raw logits at every step = DAMRO's formula on the full (pruned) pass and on the outlier-only
    pass, both recomputed without the patch per prompt, unpadded; the outliers = top-k of an eager [CLS] row
    (head mean: ``scoring="head_mean"``; the default ranking is checked in test_released_damro.py)."""
    alpha, beta, k, steps = 1.5, 0.05, 4, 3
    with vlprune.pruned(family.model, "damro", alpha=alpha, beta=beta, outliers=k, scoring="head_mean",
                        **budget) as h:
        new, logits = family.contrasted(family.pair(), steps)
        records = h.last
    assert len(records) == 2 and all(len(r.outliers) == k for r in records)
    for b, rec in enumerate(records):
        single = family.single(b)
        scores = family.cls_scores(single).cpu()
        allowed = rec.kept.cpu() if budget else torch.arange(rec.before)
        assert rec.after < rec.before if budget else rec.after == rec.before
        assert rec.outliers.cpu().tolist() == sorted(allowed[scores[allowed].topk(k).indices].tolist())
        for s in range(steps):
            full, outlier = family.independent(single, new[b, :s], rec, pruned=bool(budget))
            probs = full.float().softmax(-1)  # the formula, written out independently of DAMRO.combine
            want = ((1 + alpha) * full.float() - alpha * outlier.float()).masked_fill(probs < beta * probs.max(),
                                                                                      float("-inf"))
            got = logits[s][b]
            assert torch.equal(got.isfinite(), want.isfinite()), (b, s)
            torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=1e-4, atol=1e-4)
            assert got.argmax() == new[b, s]  # greedy picks from the contrasted logits


def test_next_outliers_compete_across_views(next_family):
    """The scenario of the test above exercises the global choice: outliers come from the base view and
    from crops, in the image's visual order (base indices first)."""
    with vlprune.pruned(next_family.model, "damro", outliers=4) as h:
        next_family.generate(next_family.pair())
        outliers = torch.cat([r.outliers.cpu() for r in h.last])
    base = next_family.side ** 2
    assert bool((outliers < base).any()) and bool((outliers >= base).any())


def test_cache_and_batches_agree(family):
    inp = family.pair()
    with vlprune.pruned(family.model, "damro", outliers=5, **PRUNE) as h:
        singles = [family.generate(family.single(i)) for i in range(2)]
        both = family.generate(inp)
        assert [(r.row, len(r.outliers)) for r in h.last] == [(0, 5), (1, 5)]
        assert torch.equal(family.generate(inp, use_cache=False), both)
        with torch.inference_mode():
            call = inp if isinstance(family, Next) else {"inputs": inp["input_ids"], "images": inp["images"],
                                                         "attention_mask": inp["attention_mask"]}
            out = family.model.generate(**call, do_sample=False, max_new_tokens=2, return_dict_in_generate=True)
        assert out.cache.layers[0].keys.shape[0] == 2  # the returned cache holds the full rows only
    for i, single in enumerate(singles):
        assert torch.equal(both[i, : single.shape[1]], single[0])


def test_disabled_and_remove_restore_the_model(family):
    inp = family.pair()
    ref = family.reference_generate(inp)
    before = hook_state(family.model)
    h = vlprune.patch(family.model, "damro", alpha=3.0, beta=0.0, outliers=2)
    assert not torch.equal(family.generate(inp), ref)  # the contrast changes greedy output on this model
    with h.disabled():
        assert torch.equal(family.generate(inp), ref)
    h.remove()
    h.remove()
    assert torch.equal(family.reference_generate(inp), ref)
    no_hooks_left(family.model, before)


def test_original_positions_original_numbers_the_outlier_rows_as_the_unpruned_prompt(original_family):
    """positions="original": the outlier rows keep each outlier's position in the unpruned prompt, and both
    kinds of rows continue after the unpruned prompt."""
    import tiny_original as to

    model = original_family.model
    inp = original_family.single(0)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("position_ids")),
                                                 with_kwargs=True)
    try:
        with vlprune.pruned(model, "damro", outliers=3, positions="original", **PRUNE) as h:
            original_family.generate(inp, max_new_tokens=2)
            outliers = h.last[0].outliers.cpu().tolist()
    finally:
        hook.remove()
    ids = inp["input_ids"][0]
    mark = int((ids == to.IMAGE_INDEX).nonzero())
    full_len = len(ids) - 1 + to.N
    prefill_outlier, step = seen[1], seen[2]
    assert prefill_outlier[0].tolist() == (list(range(mark)) + [mark + i for i in outliers]
                                           + list(range(mark + to.N, full_len)))
    assert step[:, -1].tolist() == [full_len, full_len]  # [full row; outlier row], one decoding step
