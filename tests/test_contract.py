"""The promises every pruning method keeps on every patcher that declares it supported.

The shared contract runs over every (family, method) pair: a family (tests/families.py) is a tiny model
of one patcher's model class plus its inputs; the methods are those the patcher serves
(``Patcher.support`` is not "no"; decoding methods, ``prunes = False``, have their own tests). Promises: per-image token counts and the LM sequence they give, kept indices unique and in
raster order, ratio 0 / keep-all and ``remove()`` bit-identical (logits and generate), a batch of two
left-padded prompts equals two single runs, generate with the KV cache equals generate without it, and
the context manager restores on error. LLaVA-1.5-specific promises (labels, projected survivors,
prompts with different image counts, generate's max_length) follow at the end, on the HF LLaVA only.
"""
import importlib

import pytest
import torch

import families
import syncs
import vlprune
from vlprune.budget import Budget
from vlprune.builtin_methods.base import Method
from vlprune.registry import _PATCHERS, get_method
from tiny import IMAGE_TOKEN, batch, fail_if_left_patched, learned_options, pixels, prompt

METHODS = sorted(vlprune.methods())
N = 16  # patches per tiny image
FAMILIES = {"llava_hf": families.LlavaHF, "llava_next_hf": families.LlavaNext, "qwen2_5_vl": families.Qwen,
            "llava_original": families.LlavaOriginal}


def supported(patcher_module: str) -> list[str]:
    """The pruning methods a patcher serves: derived from what each asks and what the family provides."""
    module = importlib.import_module(f"vlprune.patches.{patcher_module}")
    patcher = next(p for p in _PATCHERS.values() if p.__module__ == module.__name__)
    return [m for m in METHODS if get_method(m).prunes and not patcher.support(get_method(m)).startswith("no")]


PAIRS = [pytest.param(fam, m, id=f"{fam}-{m}") for fam in FAMILIES for m in supported(FAMILIES[fam].patcher)]


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
    wrapped = ("forward", "generate", "prepare_inputs_labels_for_multimodal", "encode_images", "_vlprune")
    assert not [name for name in wrapped if name in model.__dict__]


def budget(method, model=None, **kw):
    """The budget keywords a method takes (methods that are not budgeted take none), plus, given the
    model, a learned method's weights for it."""
    return {**(kw if get_method(method).budgeted else {}), **(learned_options(model, method) if model is not None else {})}


def expected_keep(method, k):
    if not get_method(method).prunes:  # a decoding method (damro) with no ratio/keep: every token stays
        return N
    return k if get_method(method).budgeted else 0


def adaptive(method) -> bool:
    """A stage-"llm" method with a plan (atp): rows of a batch keep their own counts, fillers even them out."""
    return get_method(method).llm_plan is not Method.llm_plan


def lm_entry(handle):
    """Where the pruned sequence starts: the LM input, or decoder layer K for methods inside the LM."""
    return handle._patcher.llm.k_layer if handle.method.stage == "llm" else None


# -- one fixture per family (session-scoped: built and loaded once) --------------------------------
@pytest.fixture(scope="session")
def family_llava_hf(_shared_llava):
    return families.LlavaHF(_shared_llava)


@pytest.fixture(scope="session")
def family_llava_next_hf(tmp_path_factory):
    from test_llava_next_hf import build, load

    return families.LlavaNext(load(build(tmp_path_factory.mktemp("contract-next"))))


@pytest.fixture(scope="session")
def family_qwen2_5_vl(tmp_path_factory):
    from test_qwen2_5_vl import build_qwen, load

    path = tmp_path_factory.mktemp("contract-qwen")
    build_qwen(path)
    return families.Qwen(load(path))


@pytest.fixture(scope="session")
def family_llava_original(tmp_path_factory):
    pytest.importorskip("llava", reason="the original LLaVA code (llava-torch) is not installed")
    import tiny_original

    return families.LlavaOriginal(tiny_original.load(tiny_original.build(tmp_path_factory.mktemp("contract-orig"))))


@pytest.fixture
def fam(request):
    """The family named by the test's parameter; a patch a test leaves behind fails it."""
    family = request.getfixturevalue(f"family_{request.param}")
    yield family
    fail_if_left_patched(family.model)


def references(fam):
    """The unpatched logits and generated ids of ``fam.pair()``, computed once per family."""
    if not hasattr(fam, "_refs"):
        inp = fam.pair()
        fam._refs = (fam.forward(inp).logits, fam.reference_generate(inp))
    return fam._refs


class Recorder:
    """Records the sequence length reaching ``module`` (registered after the patch's hooks: sees their result)."""

    def __init__(self, module):
        self.lengths = []
        self._h = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else (args[0] if args else kwargs["hidden_states"])
        self.lengths.append(x.shape[1])

    def close(self):
        self._h.remove()


def patch_kw(fam, method, **given):
    return {**budget(method, **given), **fam.options(method)}


# -- the shared contract -----------------------------------------------------------------------------
# ratio everywhere; keep (the same budget code, family-independent) on LLaVA-1.5 only, to save time
COUNT_CASES = [pytest.param(*p.values, {"ratio": 0.75}, id=f"{p.id}-ratio") for p in PAIRS] + [
    pytest.param(*p.values, {"keep": 8}, id=f"{p.id}-keep") for p in PAIRS if p.values[0] == "llava_hf"]


@pytest.mark.parametrize("fam,method,given", COUNT_CASES, indirect=["fam"])
def test_token_counts_and_raster_order(fam, method, given):
    """One prompt, two images: each keeps the budget's k of its N; the LM (or, for methods inside the LM,
    decoder layer K) gets exactly the positions the images did not lose; kept indices ascend, unique."""
    inp = fam.double()
    with vlprune.pruned(fam.model, method, **patch_kw(fam, method, **given)) as h:
        llm = h.method.stage == "llm"
        plan = h._patcher.llm.plan if llm else None  # several drops: the sequence after the last one
        rec = Recorder(fam.layers()[plan[-1] if plan else h._patcher.llm.k_layer] if llm else fam.lm())
        try:
            fam.forward(inp)
        finally:
            rec.close()
    assert len(h.last) == 2 and [r.row for r in h.last] == [0, 0]
    budgeted = get_method(method).budgeted
    for r in h.last:
        if plan:  # the method's own counts, never growing from one drop to the next
            assert list(r.counts) == plan and r.after == r.counts[plan[-1]]
            assert list(r.counts.values()) == sorted(r.counts.values(), reverse=True)
        else:
            assert r.after == (Budget(**given).tokens_for(r.before) if budgeted else 0)
        kept = r.kept.tolist()
        assert len(kept) == r.after and kept == sorted(set(kept)) and all(0 <= i < r.before for i in kept)
        if r.sources is not None:  # merges name their sources; the token an output stands for is among them
            assert r.sources.shape == (r.after, r.before) and bool((r.sources >= 0).all())
            assert bool((r.sources[torch.arange(r.after), r.kept] > 0).all())
    assert rec.lengths[0] == fam.lm_length(inp) - sum(fam.dropped(r) for r in h.last)


@pytest.mark.parametrize("fam,method", PAIRS, indirect=["fam"])
def test_ratio_zero_and_remove_are_bit_identical(fam, method):
    ref_logits, ref_ids = references(fam)
    inp = fam.pair()
    before, class_forward = hook_state(fam.model), type(fam.model).forward
    if get_method(method).budgeted:
        with vlprune.pruned(fam.model, method, **patch_kw(fam, method, ratio=0.0)) as h:
            assert torch.equal(fam.forward(inp).logits, ref_logits)
            assert torch.equal(fam.generate(inp), ref_ids)
            assert all(r.after == r.before for r in h.last) and len(h.last) == 2
        with vlprune.pruned(fam.model, method, **patch_kw(fam, method, keep=10**6)):
            assert torch.equal(fam.forward(inp).logits, ref_logits)
    h = vlprune.patch(fam.model, method, **patch_kw(fam, method, ratio=0.5))
    assert fam.generate(inp).shape[0] == 2
    h.remove()
    h.remove()  # harmless
    assert torch.equal(fam.forward(inp).logits, ref_logits)
    assert torch.equal(fam.reference_generate(inp), ref_ids)
    no_hooks_left(fam.model, before)
    assert type(fam.model).forward is class_forward  # nothing at class level


@pytest.mark.parametrize("fam,method", PAIRS, indirect=["fam"])
def test_batch_equals_single_runs_and_cache_equals_no_cache(fam, method):
    """Two prompts of different lengths, left-padded into one batch: the same new ids as one at a time,
    with and without the KV cache, and the same records."""
    with vlprune.pruned(fam.model, method, **patch_kw(fam, method, ratio=0.5)) as h:
        singles, counts = [], []
        for i in range(2):
            singles.append(fam.generate(fam.single(i)))
            counts += [(r.before, r.after, r.kept.tolist()) for r in h.last]
        inp = fam.pair()
        both = fam.generate(inp)
        assert [(r.before, r.after, r.kept.tolist()) for r in h.last] == counts
        assert [r.row for r in h.last] == [0, 1]
        assert torch.equal(fam.generate(inp, use_cache=False), both)
    for i, single in enumerate(singles):
        assert torch.equal(both[i, : single.shape[1]], single[0]), i


@pytest.mark.parametrize("fam,method", PAIRS, indirect=["fam"])
def test_context_manager_restores_on_exception(fam, method):
    ref_logits, _ = references(fam)
    inp = fam.pair()
    before = hook_state(fam.model)
    with pytest.raises(RuntimeError, match="boom"):
        with vlprune.pruned(fam.model, method, **patch_kw(fam, method, ratio=0.5)):
            fam.forward(inp)
            raise RuntimeError("boom")
    no_hooks_left(fam.model, before)
    assert torch.equal(fam.forward(inp).logits, ref_logits)


# -- LLaVA-1.5 (HF) only -----------------------------------------------------------------------------
LLAVA_METHODS = supported("llava_hf")


@pytest.mark.parametrize("method", LLAVA_METHODS)
def test_generate_keeps_output_contract(llava, method):
    ids, mask = batch([prompt()])
    with vlprune.pruned(llava, method, **budget(method, llava, ratio=0.75)):
        out = gen(llava, ids, mask, pixels(1), max_new_tokens=4)
        assert out.shape == (1, ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)
        dict_out = gen(llava, ids, mask, pixels(1), max_new_tokens=4, return_dict_in_generate=True)
        assert torch.equal(dict_out.sequences, out)
        # max_length counts the caller's prompt, as unpatched
        assert gen(llava, ids, mask, pixels(1), max_new_tokens=None, max_length=ids.shape[1] + 3).shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("method", LLAVA_METHODS)
def test_batch_with_different_image_counts_repads(llava, method):
    prompts = [prompt(n_images=2, text_before=(1, 7)), prompt(n_images=1, text_before=(1, 8, 9))]
    pv = pixels(3)
    if get_method(method).stage == "llm" and not adaptive(method):  # rows cannot differ in length mid-network
        with vlprune.pruned(llava, method, **budget(method, llava, ratio=0.5)), pytest.raises(vlprune.VlpruneError, match="same number of images"):
            gen(llava, *batch(prompts), pv)
        return
    with vlprune.pruned(llava, method, **budget(method, llava, ratio=0.5)) as h:
        singles = [gen(llava, *batch([prompts[0]]), pv[:2]), gen(llava, *batch([prompts[1]]), pv[2:])]
        ids, mask = batch(prompts)
        both = gen(llava, ids, mask, pv)
        assert [r.row for r in h.last] == [0, 0, 1]
    for i, single in enumerate(singles):
        assert torch.equal(both[i, -6:], single[0, -6:])




@pytest.mark.parametrize("method", LLAVA_METHODS)
def test_survivors_are_the_projected_selection(llava, method):
    """The LM receives projector(selected features) - for merges projector(sources @ features) - text untouched."""
    ids, mask = batch([prompt()])
    pv = pixels(1)
    rec = LMInputs(llava)
    try:
        run(llava, ids, mask, pv)
        with vlprune.pruned(llava, method, **budget(method, llava, ratio=0.75)) as h:
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
            merged = sources.to(hs.dtype) @ hs
            if hasattr(h.method, "refine"):  # a learned merge (tokenflex) weighs the averages before projecting
                merged = h.method.refine(merged)
            want = project(merged) if get_method(method).stage == "encoder" else sources @ project(hs)
    else:
        want = full[image][kept]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", LLAVA_METHODS)
def test_forward_with_labels_shortens_labels(llava, method):
    ids, mask = batch([prompt()])
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    with vlprune.pruned(llava, method, **budget(method, llava, ratio=0.75)) as h:
        out = run(llava, ids, mask, pixels(1), labels=labels)
        keep = torch.ones_like(ids, dtype=torch.bool)
        image = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
        keep[0, image] = False
        keep[0, image[h.last[0].kept]] = True
    short = labels[keep].view(1, -1)
    logits = out.logits.float()
    want = torch.nn.functional.cross_entropy(logits[0, :-1], short[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


# -- no unexplained host synchronisation ------------------------------------------------------------
DECODING = [pytest.param(fam, m, id=f"{fam}-{m}") for fam in ("llava_hf", "llava_next_hf", "llava_original")
            for m in METHODS if not getattr(get_method(m), "prunes", True)]


@pytest.mark.parametrize("fam,method", PAIRS + DECODING, indirect=["fam"])
def test_no_host_sync_that_does_not_say_why(fam, method):
    """A pruned forward (and generate) of a two-prompt batch: every syncing call (``.item()``, ``.tolist()``,
    ``bool(t)``, ``nonzero()``, a boolean-mask index, ...) made by vlprune's own code carries a ``# host
    sync:`` comment saying why the method or the shortened call needs it (tests/syncs.py). On a GPU,
    ``torch.cuda.set_sync_debug_mode`` is the complete check; this one runs everywhere."""
    inp = fam.pair()
    recorder = syncs.SyncRecorder()
    with vlprune.pruned(fam.model, method, **patch_kw(fam, method, ratio=0.75)):
        with recorder:
            fam.forward(inp)
            fam.generate(inp, max_new_tokens=2)
        if next(fam.model.parameters()).is_cuda:  # every syncing op, listed or not, on vlprune's other lines
            with syncs.CudaSyncGuard():
                fam.forward(inp)
                fam.generate(inp, max_new_tokens=2)
    assert not recorder.unexplained(), "\n".join(recorder.unexplained())


@pytest.mark.parametrize("fam", ["llava_hf", "llava_next_hf", "qwen2_5_vl"], indirect=True)
def test_num_return_sequences_keeps_the_output_contract(fam):
    """Sampling two sequences per prompt from a pruned batch: each copy starts with its caller's prompt."""
    inp = fam.pair()
    torch.manual_seed(0)
    with vlprune.pruned(fam.model, "random", ratio=0.75), torch.inference_mode():
        out = fam.model.generate(**inp, do_sample=True, num_return_sequences=2, max_new_tokens=3)
    ids = inp["input_ids"]
    assert out.shape == (4, ids.shape[1] + 3)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("method", supported("llava_hf"))
def test_threads_get_the_outputs_of_serial_calls(family_llava_hf, method):
    """One patched model, 8 threads, each with its own prompt and image: the logits equal serial calls."""
    import concurrent.futures

    model = family_llava_hf.model
    inputs = []
    for i in range(8):
        ids, mask = batch([prompt(text_before=(1, 7 + i % 3, 8 + i))])
        inputs.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(1, seed=10 + i)})

    def call(inp):
        with torch.inference_mode():
            return model(**inp).logits

    with vlprune.pruned(model, method, **budget(method, model, ratio=0.75)):
        serial = [call(inp) for inp in inputs]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(call, inputs * 2))
    for i, got in enumerate(threaded):
        assert torch.equal(got, serial[i % 8]), f"thread call {i}"


@pytest.mark.parametrize("method", supported("llava_hf"))
def test_non_finite_pixels_give_a_clear_error_or_unique_tokens(family_llava_hf, method):
    """NaN/inf in the image: the method either says so (VlpruneError) or keeps distinct tokens, as many as
    the budget says; the unpatched model itself just computes NaNs."""
    model = family_llava_hf.model
    inp = family_llava_hf.pair()
    inp["pixel_values"] = inp["pixel_values"].clone()
    inp["pixel_values"][0, :, :8] = float("nan")
    inp["pixel_values"][1, :, -8:] = float("inf")
    with vlprune.pruned(model, method, **budget(method, model, keep=8)) as h:
        try:
            family_llava_hf.forward(inp)
        except vlprune.VlpruneError as err:
            assert "pixel" in str(err) or "NaN" in str(err)
            return
        for rec in h.last:
            assert len(set(rec.kept.tolist())) == rec.after
