"""damro: contrastive decoding against the [CLS]-attention outlier tokens (vlprune/builtin_methods/damro.py,
patches/_contrast.py). The formula on hand-made tensors; on the tiny LLaVA: the identity at alpha 0,
the batched machinery at beta 1 (only the full pass's top token survives, so greedy output must equal
the unpatched model's), the captured logits against an independent computation of both passes, the
outliers against an eager-attention [CLS] row, cache, batches, sampling, composition and errors."""
import math

import pytest
import torch

import vlprune
from test_contract import gen, hook_state, no_hooks_left, run
from tiny import IMAGE_TOKEN, batch, load, pixels, prompt
from vlprune.builtin_methods.damro import DAMRO

N = 16


# -- the formula and the choice, on tensors ----------------------------------------------------------
def test_combine_is_the_contrast_with_the_plausibility_cutoff():
    full = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    outlier = torch.log(torch.tensor([[0.1, 0.6, 0.2, 0.1]]))
    m = DAMRO(alpha=1.0, beta=0.4)
    got = m.combine(full, outlier)
    want = 2 * full - outlier
    # p = 0.15 and 0.05 are below 0.4 * 0.5: cut; 0.3 stays
    assert torch.isinf(got[0, 2:]).all() and (got[0, 2:] < 0).all()
    torch.testing.assert_close(got[0, :2], want[0, :2])
    assert got.argmax().item() == 0  # 2*log .5 - log .1 > 2*log .3 - log .6
    # beta 0: no cut; the contrast alone can flip the choice
    flipped = DAMRO(alpha=3.0, beta=0.0).combine(full, torch.log(torch.tensor([[0.9, 0.02, 0.04, 0.04]])))
    assert torch.isfinite(flipped).all() and flipped.argmax().item() != 0
    # beta 1: only the full pass's top token survives, whatever the contrast says
    assert DAMRO(alpha=5.0, beta=1.0).combine(full, outlier)[0].isfinite().nonzero().flatten().tolist() == [0]


def test_cutoff_is_relative_to_the_top_probability_not_a_logit_offset():
    full = torch.tensor([[10.0, 10.0 + math.log(0.1) + 1e-4, 10.0 + math.log(0.1) - 1e-4]])
    got = DAMRO(alpha=0.5, beta=0.1).combine(full, torch.zeros_like(full))
    assert got.isfinite().tolist() == [[True, True, False]]


def test_choose_takes_the_top_scores_among_the_allowed_tokens_in_raster_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05, 0.7])
    m = DAMRO(outliers=3)
    assert m.choose(scores).tolist() == [1, 3, 5]
    assert m.choose(scores, torch.tensor([0, 2, 3, 4])).tolist() == [0, 2, 3]
    assert m.choose(scores, torch.tensor([4, 5])).tolist() == [4, 5]  # fewer allowed than outliers: all of them


@pytest.mark.parametrize("options,match", [
    ({"outliers": 0}, "outliers must be an int >= 1"), ({"outliers": 2.5}, "outliers must be"),
    ({"alpha": -1}, "alpha must be a number >= 0"), ({"alpha": float("nan")}, "alpha must be"),
    ({"beta": 1.5}, r"beta must be in \[0, 1\]"), ({"layer": "last"}, "layer must be an int"),
    ({"prune": "fastv"}, "stage 'llm'"), ({"prune": "damro"}, "not a pruning method"),
    ({"prune": "fastervlmm"}, "Did you mean 'fastervlm'"), ({"prune_options": {"layer": -3}}, "needs prune="),
    ({"prune": "fastervlm", "prune_options": {"depth": 1}}, "unknown option"),
    ({"gamma": 1}, "unknown option"),
])
def test_bad_options_are_named(llava, options, match):
    with pytest.raises(vlprune.VlpruneError, match=match):
        vlprune.patch(llava, "damro", **({"ratio": 0.5} if "prune" in options else {}), **options)
    assert "_vlprune" not in llava.__dict__


def test_budget_belongs_to_the_prune_method(llava):
    with pytest.raises(vlprune.VlpruneError, match="without prune= keeps every visual token"):
        vlprune.patch(llava, "damro", ratio=0.5)
    with pytest.raises(vlprune.VlpruneError, match="exactly one of ratio"):
        vlprune.patch(llava, "damro", prune="fastervlm")
    with vlprune.pruned(llava, "damro", prune="fastervlm", keep=6, prune_options={"layer": -3}) as h:
        assert h.method.name == "fastervlm" and h.method.layer == -3 and h.decoder.name == "damro"
        assert h.config.options == {"outliers": 10, "alpha": 2.0, "beta": 0.1, "layer": -2, "scoring": "joint", "prune": "fastervlm",
                                    "prune_options": {"layer": -3}}
        assert vlprune.api.PatchConfig.from_dict(h.config.to_dict()) == h.config


# -- on the tiny LLaVA --------------------------------------------------------------------------------
def _prompts():
    return [prompt(text_before=(1, 7, 8, 9, 10)), prompt(text_before=(1,))]  # left padding for the second


def test_alpha_zero_is_the_identity(llava):
    ids, mask = batch(_prompts())
    pv = pixels(2)
    ref_ids, ref_logits = gen(llava, ids, mask, pv), run(llava, ids, mask, pv).logits
    with vlprune.pruned(llava, "damro", alpha=0.0) as h:
        assert torch.equal(gen(llava, ids, mask, pv), ref_ids)
        assert torch.equal(run(llava, ids, mask, pv).logits, ref_logits)
        assert not hasattr(h._patcher, "contrast_taps")  # no outlier pass at all


def test_alpha_zero_sampling_is_the_identity(llava):
    ids, mask = batch(_prompts())
    pv = pixels(2)

    def sample():
        torch.manual_seed(11)
        with torch.inference_mode():
            return llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, do_sample=True, top_k=0,
                                  max_new_tokens=6)

    ref = sample()
    with vlprune.pruned(llava, "damro", alpha=0.0):
        assert torch.equal(sample(), ref)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beta_one_runs_the_contrast_and_keeps_greedy_output(llava, use_cache):
    """beta = 1 leaves only the full pass's top token, so greedy decoding must give the unpatched ids,
    although every step ran the batched full + outlier rows (the recorded outliers show it ran)."""
    ids, mask = batch(_prompts())
    pv = pixels(2)
    ref = gen(llava, ids, mask, pv, max_new_tokens=8)
    with vlprune.pruned(llava, "damro", alpha=3.0, beta=1.0, outliers=3) as h:
        assert torch.equal(gen(llava, ids, mask, pv, max_new_tokens=8, use_cache=use_cache), ref)
        assert [len(r.outliers) for r in h.last] == [3, 3] and all(r.after == N for r in h.last)


def _independent_logits(model, ids, pv, new, kept, outliers):
    """Without the patch, for one unpadded prompt with one image followed by the tokens ``new``: the
    last-position logits of the prompt whose image is its ``kept`` tokens, and of the prompt whose image
    is its ``outliers`` only - the placeholders cut to that count and filled by hand with the projected
    layer -2 features of those tokens (contiguous positions, as the patch renumbers them)."""
    with torch.inference_mode():
        hidden = model.model.vision_tower(pv[None], output_hidden_states=True).hidden_states[-2][0, 1:]
        project = model.model.multi_modal_projector
        image = (ids == IMAGE_TOKEN).nonzero().flatten()

        def last_logits(tokens):
            short = torch.cat([ids[: image[0]], ids[image[0] : image[0] + len(tokens)], ids[image[-1] + 1 :], new])
            embeds = model.get_input_embeddings()(short).clone()
            embeds[image[0] : image[0] + len(tokens)] = project(hidden[tokens])
            return model(inputs_embeds=embeds[None]).logits[0, -1]

        return last_logits(kept), last_logits(outliers)


@pytest.mark.parametrize("prune", [None, "fastervlm"])
def test_combined_logits_are_the_formula_on_two_independent_passes(llava, llava_path, prune):
    """generate's raw logits (output_logits) at every step = DAMRO's formula on the full pass and on the
    outlier-only pass, both recomputed here without the patch, per prompt, unpadded."""
    prompts = _prompts()
    ids, mask = batch(prompts)
    pv = pixels(2)
    alpha, beta, k, steps = 1.5, 0.05, 4, 4
    budget = {"prune": "fastervlm", "keep": 8} if prune else {}
    with vlprune.pruned(llava, "damro", alpha=alpha, beta=beta, outliers=k, **budget) as h:
        out = gen(llava, ids, mask, pv, max_new_tokens=steps, return_dict_in_generate=True, output_logits=True)
        records = h.last
    # outliers: the top-k of an eager-attention run's head-mean [CLS] row (among the kept tokens when pruning)
    eager_rows = _eager_rows(llava_path, pv)
    for b, rec in enumerate(records):
        allowed = rec.kept.cpu() if prune else torch.arange(N)
        want_outliers = sorted(allowed[eager_rows[b][allowed].topk(k).indices].tolist())
        assert rec.outliers.cpu().tolist() == want_outliers
    new = out.sequences[:, ids.shape[1]:]
    for b, p in enumerate(prompts):
        row = torch.tensor(p, device=ids.device)
        for s in range(steps):
            # the full pass is the (pruned) model's: the image through its kept tokens only (all without prune)
            full, outlier = _independent_logits(llava, row, pv[b], new[b, :s], records[b].kept, records[b].outliers)
            probs = full.float().softmax(-1)  # the formula, written out independently of DAMRO.combine
            want = ((1 + alpha) * full.float() - alpha * outlier.float()).masked_fill(probs < beta * probs.max(),
                                                                                      float("-inf"))
            got = out.logits[s][b]
            assert torch.equal(got.isfinite(), want.isfinite()), (b, s)
            torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=1e-4, atol=1e-4)
            assert got.argmax() == new[b, s]  # greedy picks from the contrasted logits


def _eager_rows(llava_path, pv, layer=-2):
    eager = load(llava_path, attn_implementation="eager")
    with torch.inference_mode():
        return eager.model.vision_tower(pv, output_attentions=True).attentions[layer][:, :, 0, 1:].mean(1).cpu()


def test_cache_and_batches_agree(llava):
    prompts = [prompt(n_images=2, text_before=(1, 7)), prompt(text_before=(1, 8, 9))]  # 2 images vs 1: re-padded
    pv = pixels(3)
    with vlprune.pruned(llava, "damro", outliers=5) as h:
        singles = [gen(llava, *batch([prompts[0]]), pv[:2]), gen(llava, *batch([prompts[1]]), pv[2:])]
        ids, mask = batch(prompts)
        both = gen(llava, ids, mask, pv)
        assert [(r.row, len(r.outliers)) for r in h.last] == [(0, 5), (0, 5), (1, 5)]
        assert torch.equal(gen(llava, ids, mask, pv, use_cache=False), both)
        dict_out = gen(llava, ids, mask, pv, return_dict_in_generate=True)
        assert torch.equal(dict_out.sequences, both)
        assert dict_out.cache.layers[0].keys.shape[0] == 2  # the returned cache holds the full rows only
    for i, single in enumerate(singles):
        assert torch.equal(both[i, -6:], single[0, -6:])
        assert torch.equal(both[i, : ids.shape[1]], ids[i])


def test_sampling_is_seeded_and_draws_only_plausible_tokens(llava):
    ids, mask = batch(_prompts())
    pv = pixels(2)

    def sample(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            return llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, do_sample=True, top_k=0,
                                  max_new_tokens=8, return_dict_in_generate=True, output_logits=True)

    with vlprune.pruned(llava, "damro", alpha=1.0, beta=0.2):
        a, b = sample(5), sample(5)
        assert torch.equal(a.sequences, b.sequences)
        new = a.sequences[:, ids.shape[1]:]
        for s, logits in enumerate(a.logits):
            assert bool(logits.gather(1, new[:, s : s + 1]).isfinite().all())  # never a cut-off token
            assert bool((~logits.isfinite()).any())  # the cut-off removed something
        assert any(not torch.equal(sample(seed).sequences, a.sequences) for seed in range(6, 12))


def test_generate_output_contract_and_max_length(llava):
    ids, mask = batch(_prompts())
    with vlprune.pruned(llava, "damro", prune="fastervlm", ratio=0.75):
        out = gen(llava, ids, mask, pixels(2), max_new_tokens=4)
        assert out.shape == (2, ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)
        assert gen(llava, ids, mask, pixels(2), max_new_tokens=None, max_length=ids.shape[1] + 3).shape[1] == ids.shape[1] + 3


def test_composed_pruning_feeds_the_lm_k_tokens_and_forward_is_the_pruned_model(llava):
    ids, mask = batch([prompt()])
    pv = pixels(1)
    with vlprune.pruned(llava, "fastervlm", ratio=0.75) as h:
        want = run(llava, ids, mask, pv).logits
        kept = h.last[0].kept
    with vlprune.pruned(llava, "damro", prune="fastervlm", ratio=0.75) as h:
        assert torch.equal(run(llava, ids, mask, pv).logits, want)  # forward: the pruned model, no contrast
        gen(llava, ids, mask, pv)
        assert torch.equal(h.last[0].kept, kept) and h.last[0].after == 4 and len(h.last[0].outliers) == 4


def test_disabled_and_remove_restore_the_model(llava):
    ids, mask = batch(_prompts())
    pv = pixels(2)
    ref_ids, ref_logits = gen(llava, ids, mask, pv), run(llava, ids, mask, pv).logits
    before = hook_state(llava)
    h = vlprune.patch(llava, "damro", alpha=3.0, beta=0.0, outliers=2)
    contrasted = gen(llava, ids, mask, pv)
    assert not torch.equal(contrasted, ref_ids)  # the contrast changes greedy output on this model
    with h.disabled():
        assert torch.equal(gen(llava, ids, mask, pv), ref_ids)
    h.remove()
    h.remove()
    assert torch.equal(gen(llava, ids, mask, pv), ref_ids)
    assert torch.equal(run(llava, ids, mask, pv).logits, ref_logits)
    no_hooks_left(llava, before)


def test_beams_and_embeddings_are_rejected_clearly(llava):
    ids, mask = batch([prompt()])
    with vlprune.pruned(llava, "damro"):
        with pytest.raises(vlprune.VlpruneError, match="num_beams=1"):
            gen(llava, ids, mask, pixels(1), num_beams=2)
        embeds = llava.get_input_embeddings()(ids)
        with pytest.raises(vlprune.VlpruneError, match="input_ids"), torch.inference_mode():
            llava.generate(inputs_embeds=embeds, attention_mask=mask, pixel_values=pixels(1), max_new_tokens=2)


def test_models_without_support_reject_it():
    """Qwen2.5-VL has no [CLS] token to rank outliers by (LLaVA-NeXT and the original LLaVA code serve
    damro: test_method_damro_families.py)."""
    from test_qwen2_5_vl import qwen_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(depth=2, fullatt=(1,), lm_layers=1))
    with pytest.raises(vlprune.VlpruneError, match="method='damro' is not served on Qwen2_5_VLForConditionalGeneration"):
        vlprune.patch(model, "damro")
    assert "_vlprune" not in model.__dict__
