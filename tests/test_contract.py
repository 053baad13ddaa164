"""The promises every registered method keeps on every patcher (here: HF LLaVA-1.5)."""
import pytest
import torch

import vlprune
from vlprune.registry import get_method
from tiny import IMAGE_TOKEN, batch, pixels, prompt

METHODS = sorted(vlprune.methods())
N = 16  # patches per tiny image


def run(model, ids, mask, pv, **kw):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pv, **kw)


def gen(model, ids, mask, pv, **kw):
    kw.setdefault("max_new_tokens", 6)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, do_sample=False, **kw)


class LMInputs:
    """Records what reaches the language model (or, with ``layer``, one decoder layer)."""

    def __init__(self, model, layer=None):
        self.calls = []
        lm = model.model.language_model
        target = lm if layer is None else lm.layers[layer]
        self._h = target.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, args, kwargs):
        embeds = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else (args[0] if args else kwargs["hidden_states"])
        self.calls.append({"embeds": embeds, "position_ids": kwargs.get("position_ids")})

    def close(self):
        self._h.remove()


def hook_state(model):
    """Every hook on every module, except transformers' own output-capture hooks (installed lazily)."""
    def ours(hooks):
        return [h for h in hooks.values() if not getattr(h, "__module__", "").startswith("transformers")]

    return [(name, ours(m._forward_hooks), ours(m._forward_pre_hooks)) for name, m in model.named_modules()]


def no_hooks_left(model, before):
    assert hook_state(model) == before
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__ and "_vlprune" not in model.__dict__


def budget(method, **kw):
    """The budget keywords a method takes (methods that are not budgeted take none)."""
    return kw if get_method(method).budgeted else {}


def expected_keep(method, k):
    return k if get_method(method).budgeted else 0


def lm_entry(handle):
    """Where the pruned sequence starts: the LM input, or decoder layer K for methods inside the LM."""
    return handle._patcher.llm.k_layer if handle.method.stage == "llm" else None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("given,k", [({"ratio": 0.75}, 4), ({"keep": 8}, 8)])
def test_image_positions_reaching_lm_are_k_per_image(llava, method, given, k):
    ids, mask = batch([prompt(n_images=2)])
    with vlprune.pruned(llava, method, **budget(method, **given)) as h:
        rec = LMInputs(llava, lm_entry(h))  # registered after the patch's own hooks: sees their result
        try:
            run(llava, ids, mask, pixels(2))
        finally:
            rec.close()
        k = expected_keep(method, k)
        assert [(r.before, r.after, r.row) for r in h.last] == [(N, k, 0), (N, k, 0)]
    assert rec.calls[0]["embeds"].shape[1] == ids.shape[1] - 2 * (N - k)


@pytest.mark.parametrize("method", METHODS)
def test_kept_indices_unique_sorted_in_range(llava, method):
    ids, mask = batch([prompt(), prompt(text_before=(1, 3))])
    with vlprune.pruned(llava, method, **budget(method, keep=5)) as h:
        run(llava, ids, mask, pixels(2))
        for r in h.last:
            kept = r.kept.tolist()
            assert len(kept) == expected_keep(method, 5) and kept == sorted(set(kept))
            assert all(0 <= i < N for i in kept)


@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_is_bit_identical(llava, method):
    if not get_method(method).budgeted:
        pytest.skip("not budgeted: it has no ratio 0 (its identity is handle.disabled(), tested elsewhere)")
    ids, mask = batch([prompt()])
    pv = pixels(1)
    ref_logits, ref_ids = run(llava, ids, mask, pv).logits, gen(llava, ids, mask, pv)
    with vlprune.pruned(llava, method, ratio=0.0) as h:
        assert torch.equal(run(llava, ids, mask, pv).logits, ref_logits)
        assert torch.equal(gen(llava, ids, mask, pv), ref_ids)
        assert h.last[0].after == N
    with vlprune.pruned(llava, method, keep=N):
        assert torch.equal(run(llava, ids, mask, pv).logits, ref_logits)


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_bit_identical(llava, method):
    ids, mask = batch([prompt()])
    pv = pixels(1)
    ref_logits, ref_ids = run(llava, ids, mask, pv).logits, gen(llava, ids, mask, pv)
    before = hook_state(llava)
    h = vlprune.patch(llava, method, **budget(method, ratio=0.5))
    pruned_ids = gen(llava, ids, mask, pv)
    assert pruned_ids.shape[1] == ref_ids.shape[1]
    h.remove()
    h.remove()  # harmless
    assert torch.equal(run(llava, ids, mask, pv).logits, ref_logits)
    assert torch.equal(gen(llava, ids, mask, pv), ref_ids)
    no_hooks_left(llava, before)


@pytest.mark.parametrize("method", METHODS)
def test_generate_keeps_output_contract(llava, method):
    ids, mask = batch([prompt()])
    with vlprune.pruned(llava, method, **budget(method, ratio=0.75)):
        out = gen(llava, ids, mask, pixels(1), max_new_tokens=4)
        assert out.shape == (1, ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)
        dict_out = gen(llava, ids, mask, pixels(1), max_new_tokens=4, return_dict_in_generate=True)
        assert torch.equal(dict_out.sequences, out)
        # max_length counts the caller's prompt, as unpatched
        assert gen(llava, ids, mask, pixels(1), max_new_tokens=None, max_length=ids.shape[1] + 3).shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("method", METHODS)
def test_batch_with_left_padding_equals_single_runs(llava, method):
    prompts = [prompt(text_before=(1, 7, 8, 9, 10, 11)), prompt(text_before=(1,))]
    pv = pixels(2)
    with vlprune.pruned(llava, method, **budget(method, ratio=0.5)):
        singles = [gen(llava, *batch([p]), pv[i : i + 1]) for i, p in enumerate(prompts)]
        ids, mask = batch(prompts)
        both = gen(llava, ids, mask, pv)
    for i, single in enumerate(singles):
        assert torch.equal(both[i, -6:], single[0, -6:])
        assert torch.equal(both[i, : ids.shape[1]], ids[i])


@pytest.mark.parametrize("method", METHODS)
def test_batch_with_different_image_counts_repads(llava, method):
    prompts = [prompt(n_images=2, text_before=(1, 7)), prompt(n_images=1, text_before=(1, 8, 9))]
    pv = pixels(3)
    if get_method(method).stage == "llm":  # rows cannot have different lengths mid-network: a clear error
        with vlprune.pruned(llava, method, **budget(method, ratio=0.5)), pytest.raises(vlprune.VlpruneError, match="same number of images"):
            gen(llava, *batch(prompts), pv)
        return
    with vlprune.pruned(llava, method, **budget(method, ratio=0.5)) as h:
        singles = [gen(llava, *batch([prompts[0]]), pv[:2]), gen(llava, *batch([prompts[1]]), pv[2:])]
        ids, mask = batch(prompts)
        both = gen(llava, ids, mask, pv)
        assert [r.row for r in h.last] == [0, 0, 1]
    for i, single in enumerate(singles):
        assert torch.equal(both[i, -6:], single[0, -6:])


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_cache_equals_without(llava, method):
    ids, mask = batch([prompt(), prompt(text_before=(1, 4))])
    with vlprune.pruned(llava, method, **budget(method, ratio=0.5)):
        assert torch.equal(gen(llava, ids, mask, pixels(2), use_cache=True), gen(llava, ids, mask, pixels(2), use_cache=False))


@pytest.mark.parametrize("method", METHODS)
def test_context_manager_restores_on_exception(llava, method):
    ids, mask = batch([prompt()])
    ref = run(llava, ids, mask, pixels(1)).logits
    before = hook_state(llava)
    with pytest.raises(RuntimeError, match="boom"):
        with vlprune.pruned(llava, method, **budget(method, ratio=0.5)):
            run(llava, ids, mask, pixels(1))
            raise RuntimeError("boom")
    no_hooks_left(llava, before)
    assert torch.equal(run(llava, ids, mask, pixels(1)).logits, ref)


@pytest.mark.parametrize("method", METHODS)
def test_survivors_are_the_projected_selection(llava, method):
    """The LM receives projector(selected features) - for merges projector(sources @ features) - text untouched."""
    ids, mask = batch([prompt()])
    pv = pixels(1)
    rec = LMInputs(llava)
    try:
        run(llava, ids, mask, pv)
        with vlprune.pruned(llava, method, **budget(method, ratio=0.75)) as h:
            run(llava, ids, mask, pv)
            kept = h.last[0].kept
    finally:
        rec.close()
    full, short = rec.calls[0]["embeds"][0], rec.calls[1]["embeds"][0]
    image = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    text_full = full[ids[0] != IMAGE_TOKEN]
    if get_method(method).stage != "llm":
        text_short = torch.cat([short[: image[0]], short[image[0] + len(kept):]])
        assert torch.equal(text_full, text_short)
    if get_method(method).stage == "llm":  # the LM input is untouched; pruning starts at layer K (own test)
        assert torch.equal(full, short)
        return
    got = short[image[0] : image[0] + len(kept)]
    if get_method(method).stage == "in_encoder":
        # later encoder layers ran on fewer tokens, so features differ by design (see its own test)
        assert got.shape == (len(kept), full.shape[-1]) and not torch.equal(got, full[image][kept])
        return
    sources = h.last[0].sources
    if sources is not None:  # merged tokens: the recorded weights are exactly the merge
        with torch.inference_mode():
            hs = llava.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][0, 1:]
            project = llava.model.multi_modal_projector
            want = project(sources.to(hs.dtype) @ hs) if get_method(method).stage == "encoder" else sources @ project(hs)
    else:
        want = full[image][kept]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_forward_with_labels_shortens_labels(llava, method):
    ids, mask = batch([prompt()])
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    with vlprune.pruned(llava, method, **budget(method, ratio=0.75)) as h:
        out = run(llava, ids, mask, pixels(1), labels=labels)
        keep = torch.ones_like(ids, dtype=torch.bool)
        image = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
        keep[0, image] = False
        keep[0, image[h.last[0].kept]] = True
    short = labels[keep].view(1, -1)
    logits = out.logits.float()
    want = torch.nn.functional.cross_entropy(logits[0, :-1], short[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


@pytest.mark.parametrize("method", METHODS)
def test_merge_records_name_their_sources(llava, method):
    """Merging methods say which source tokens each output merged; the token an output stands for is among them."""
    ids, mask = batch([prompt(), prompt(text_before=(1, 4))])
    with vlprune.pruned(llava, method, **budget(method, keep=5)) as h:
        run(llava, ids, mask, pixels(2))
    for rec in h.last:
        if rec.sources is None:
            continue
        assert rec.sources.shape == (rec.after, rec.before)
        assert bool((rec.sources >= 0).all()) and bool((rec.sources.sum(1) > 0).all())
        assert bool((rec.sources[torch.arange(rec.after), rec.kept] > 0).all())
