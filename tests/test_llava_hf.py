"""HF LLaVA-1.5 patcher: errors, reversibility, signal capture, positions, dtypes, pipeline."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlprune
from test_contract import LMInputs, adaptive, budget, expected_keep, gen, hook_state, no_hooks_left, run
from tiny import DEVICE, IMAGE_TOKEN, batch, build_llava, load, pixels, prompt

N = 16


# -- errors ---------------------------------------------------------------------------------------
def test_unsupported_model_lists_supported(llava):
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.patch(llava.model.language_model, "fastervlm", ratio=0.5)
    assert "LlamaModel" in str(err.value) and "LlavaForConditionalGeneration" in str(err.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "fastrvlm", "ratio": 0.5}, "Did you mean 'fastervlm'"),
    ({"method": "fastervlm"}, "exactly one of ratio"),
    ({"method": "fastervlm", "ratio": 0.5, "keep": 4}, "exactly one of ratio"),
    ({"method": "fastervlm", "ratio": 1.5}, "ratio must be in [0, 1)"),
    ({"method": "fastervlm", "keep": 0}, "keep must be >= 1"),
    ({"method": "fastervlm", "ratio": 0.5, "layer": 12}, "layer=12 is out of range for a 12-layer vision encoder"),
    ({"method": "fastervlm", "ratio": 0.5, "positions": "orig"}, "positions must be one of"),
    ({"method": "uniform", "ratio": 0.5, "seed": 1}, "unknown option(s) seed for method='uniform'"),
])
def test_bad_arguments_fail_before_touching_the_model(llava, kwargs, needle):
    before = hook_state(llava)
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.patch(llava, **kwargs)
    assert needle in str(err.value)
    no_hooks_left(llava, before)


def test_placeholder_mismatch_is_clear(llava):
    ids, mask = batch([prompt(n_patches=15)])
    with vlprune.pruned(llava, "fastervlm", ratio=0.5):
        with pytest.raises(vlprune.VlpruneError, match="image features and placeholders do not match"):
            run(llava, ids, mask, pixels(1))
        ids, mask = batch([prompt()])
        with pytest.raises(vlprune.VlpruneError, match="2 images in pixel_values, placeholders for 1"):
            run(llava, ids, mask, pixels(2))


def test_ratio_too_high_for_the_image_is_an_error(llava):
    ids, mask = batch([prompt()])
    with vlprune.pruned(llava, "fastervlm", ratio=0.99):
        with pytest.raises(vlprune.VlpruneError, match="keeps no token"):
            run(llava, ids, mask, pixels(1))


# -- reversibility and isolation ------------------------------------------------------------------
def test_patch_twice_replaces_and_never_stacks(llava):
    before = hook_state(llava)
    first = vlprune.patch(llava, "fastervlm", ratio=0.5)
    one_patch = hook_state(llava)
    second = vlprune.patch(llava, "uniform", keep=3)
    assert not first.active and second.active and llava._vlprune is second
    assert sum(len(f) + len(p) for _, f, p in hook_state(llava)) <= sum(len(f) + len(p) for _, f, p in one_patch)
    ids, mask = batch([prompt()])
    run(llava, ids, mask, pixels(1))
    assert second.last[0].after == 3 and first.last == []
    first.remove()  # an inactive handle does not disturb the live one
    assert llava._vlprune is second
    second.remove()
    no_hooks_left(llava, before)


@pytest.mark.parametrize("method,kwargs,needle", [
    ("fastervlm", {"ratio": 0.5, "layer": 99}, "layer=99 is out of range"),  # fails while installing
    ("uniform", {"ratio": 0.5, "seed": 1}, "unknown option(s) seed"),  # fails while validating
    ("fastervlm", {"ratio": 1.5}, "ratio must be in [0, 1)"),
])
def test_failed_repatch_leaves_the_earlier_patch_active(llava, method, kwargs, needle):
    before = hook_state(llava)
    ids, mask = batch([prompt()])
    ref = run(llava, ids, mask, pixels(1)).logits
    first = vlprune.patch(llava, "fastervlm", keep=4)
    with pytest.raises(vlprune.VlpruneError) as err:
        vlprune.patch(llava, method, **kwargs)
    assert needle in str(err.value) and "the earlier patch (method='fastervlm') is still active" in str(err.value)
    assert llava._vlprune is first and first.active
    kept = run(llava, ids, mask, pixels(1)).logits
    assert first.last[0].after == 4
    first.remove()
    no_hooks_left(llava, before)
    assert torch.equal(run(llava, ids, mask, pixels(1)).logits, ref)
    with vlprune.pruned(llava, "fastervlm", keep=4):  # a fresh patch prunes the same way
        assert torch.equal(run(llava, ids, mask, pixels(1)).logits, kept)


def test_repatch_failing_with_any_error_restores_the_earlier_patch(llava, monkeypatch):
    """An unexpected error half-way through installing (after hooks went in) keeps its type; the earlier patch
    comes back and a note says so."""
    before = hook_state(llava)
    first = vlprune.patch(llava, "fastervlm", keep=4)
    patcher_class = type(first._patcher)
    original, calls = patcher_class.install, []

    def install_then_fail_once(self):
        original(self)
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(patcher_class, "install", install_then_fail_once)
    with pytest.raises(RuntimeError, match="boom") as err:
        vlprune.patch(llava, "uniform", keep=3)
    if hasattr(err.value, "add_note"):  # Python >= 3.11
        assert "the earlier patch (method='fastervlm') is still active" in "".join(err.value.__notes__)
    assert llava._vlprune is first and first.active and len(calls) == 2
    ids, mask = batch([prompt()])
    run(llava, ids, mask, pixels(1))
    assert first.last[0].after == 4
    first.remove()
    no_hooks_left(llava, before)


def test_unpatch_removes_whatever_is_installed(llava):
    before = hook_state(llava)
    ids, mask = batch([prompt()])
    ref = run(llava, ids, mask, pixels(1)).logits
    handle = vlprune.patch(llava, "uniform", keep=3)
    assert vlprune.unpatch(llava) is True and not handle.active
    no_hooks_left(llava, before)
    assert torch.equal(run(llava, ids, mask, pixels(1)).logits, ref)
    assert vlprune.unpatch(llava) is False
    handle.remove()  # still harmless


def test_method_object_equals_name_and_keywords(llava):
    ids, mask = batch([prompt()])
    with vlprune.pruned(llava, "fastervlm", keep=5, layer=-3) as by_name:
        ref = run(llava, ids, mask, pixels(1)).logits
        ref_last = by_name.last
    with vlprune.pruned(llava, vlprune.methods.FasterVLM(layer=-3), keep=5) as by_object:
        assert by_object.config == by_name.config and by_object.method == by_name.method
        assert torch.equal(run(llava, ids, mask, pixels(1)).logits, ref)
        assert [r.kept.tolist() for r in by_object.last] == [r.kept.tolist() for r in ref_last]
        assert all(torch.equal(a.scores, b.scores) for a, b in zip(by_object.last, ref_last))
        assert repr(by_object.last[0]) == repr(ref_last[0]) and len(repr(by_object.last)) < 120


def test_second_model_and_class_are_untouched(llava, llava_path):
    from transformers import LlavaForConditionalGeneration

    other = load(llava_path)
    ids, mask = batch([prompt()])
    ref = run(other, ids, mask, pixels(1)).logits
    class_forward, class_generate = LlavaForConditionalGeneration.forward, LlavaForConditionalGeneration.generate
    with vlprune.pruned(llava, "fastervlm", ratio=0.75):
        assert torch.equal(run(other, ids, mask, pixels(1)).logits, ref)
        assert LlavaForConditionalGeneration.forward is class_forward
        assert LlavaForConditionalGeneration.generate is class_generate
        assert run(llava, ids, mask, pixels(1)).logits.shape[1] == ids.shape[1] - 12


def test_disabled_runs_unpruned_temporarily(llava):
    ids, mask = batch([prompt()])
    ref = run(llava, ids, mask, pixels(1)).logits
    with vlprune.pruned(llava, "fastervlm", ratio=0.75) as h:
        with h.disabled():
            assert torch.equal(run(llava, ids, mask, pixels(1)).logits, ref)
        assert run(llava, ids, mask, pixels(1)).logits.shape[1] == ids.shape[1] - 12


def test_config_round_trips_json(llava):
    with vlprune.pruned(llava, "random", keep=5, positions="original", seed=3) as h:
        data = json.loads(h.config.to_json())
        assert data == {"method": "random", "ratio": None, "keep": 5, "positions": "original", "options": {"seed": 3}}
        assert vlprune.PatchConfig.from_dict(data) == h.config
    with vlprune.pruned(llava, "fastervlm", ratio=0.5) as h:  # defaults in effect are recorded too
        assert h.config.options == {"layer": -2}


def test_text_only_calls_pass_through(llava):
    ids = torch.tensor([[1, 7, 8, 9]], device=DEVICE)
    ref = run(llava, ids, None, None).logits
    with vlprune.pruned(llava, "fastervlm", ratio=0.75):
        assert torch.equal(run(llava, ids, None, None).logits, ref)


# -- signal capture -------------------------------------------------------------------------------
def test_capture_matches_eager_attention_and_keeps_sdpa(llava_path):
    sdpa, eager = load(llava_path, attn_implementation="sdpa"), load(llava_path, attn_implementation="eager")
    ids, mask = batch([prompt(), prompt(text_before=(1, 3))])
    pv = pixels(2)
    with torch.inference_mode():
        attn = eager.model.vision_tower(pv, output_attentions=True).attentions[-2]  # the layer that feeds LLaVA
    want = attn[:, :, 0, 1:].mean(1)
    for model in (sdpa, eager):
        with vlprune.pruned(model, "fastervlm", keep=5) as h:
            run(model, ids, mask, pv)
            assert model.model.vision_tower.config._attn_implementation == model.config._attn_implementation
            for i, rec in enumerate(h.last):
                torch.testing.assert_close(rec.scores, want[i], rtol=1e-5, atol=1e-7)
                assert rec.kept.tolist() == want[i].topk(5).indices.sort().values.tolist()
    assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"


class ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _square_attention(shapes, n):
    return [s for s in shapes if len(s) >= 2 and s[-1] == n and s[-2] == n]


def test_capture_never_forms_n_by_n(tmp_path):
    """The pruned forward on an SDPA tower creates no (.., N, N) tensor; the eager tower does (control)."""
    model = build_llava(tmp_path / "m", image_size=112, vision_layers=3)  # 8 x 8 patches, N = 65 tokens
    eager = build_llava(tmp_path / "e", image_size=112, vision_layers=3, attn="eager")
    prompt_ids, mask = batch([prompt(n_patches=64)])
    pv = pixels(1, size=112)
    for m in (model, eager):
        with vlprune.pruned(m, "fastervlm", keep=8) as h, torch.inference_mode(), ShapeLog() as log:
            m(input_ids=prompt_ids, attention_mask=mask, pixel_values=pv)
        assert h.last[0].after == 8
        if m is model:
            assert _square_attention(log.shapes, 65) == []
            assert (1, 4, 65) in log.shapes  # the [CLS] row: O(N)
        else:
            assert _square_attention(log.shapes, 65), "control: eager attention does form N x N"


# -- positions ------------------------------------------------------------------------------------
def test_positions_contiguous_and_original(llava):
    ids, mask = batch([prompt()])
    L = ids.shape[1]
    image_start = 3
    for positions in ("contiguous", "original"):
        rec = LMInputs(llava)
        try:
            with vlprune.pruned(llava, "fastervlm", keep=4, positions=positions) as h:
                run(llava, ids, mask, pixels(1))
                gen(llava, ids, mask, pixels(1), max_new_tokens=3)
                kept = h.last[0].kept
        finally:
            rec.close()
        fwd, prefill, first_step = rec.calls[0], rec.calls[1], rec.calls[2]
        if positions == "contiguous":
            assert fwd["position_ids"] is None  # the LM counts 0..L'-1 itself, as unpatched
            assert prefill["position_ids"][0].tolist() == list(range(L - 12))
            assert first_step["position_ids"][0].tolist() == [L - 12]
        else:
            text = list(range(image_start)) + [image_start + int(i) for i in kept] + list(range(image_start + N, L))
            assert fwd["position_ids"][0].tolist() == text
            assert prefill["position_ids"][0].tolist() == text
            assert first_step["position_ids"][0].tolist() == [L]  # decoding continues after the original prompt


# -- dtypes, inputs, pipeline ---------------------------------------------------------------------
def test_bf16(llava_path):
    model = load(llava_path, dtype=torch.bfloat16)
    ids, mask = batch([prompt(), prompt(text_before=(1, 4, 4))])
    pv = pixels(2).to(torch.bfloat16)
    ref = run(model, ids, mask, pv).logits
    with vlprune.pruned(model, "fastervlm", ratio=0.0):
        assert torch.equal(run(model, ids, mask, pv).logits, ref)
    for method in vlprune.methods():
        with vlprune.pruned(model, method, **budget(method, model, ratio=0.75)) as h:
            out = gen(model, ids, mask, pv, max_new_tokens=3)
            assert out.shape == (2, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)
            want = [r.counts[max(r.counts)] if adaptive(method) else expected_keep(method, 4) for r in h.last]
            assert [r.after for r in h.last] == want
            assert run(model, ids, mask, pv).logits.dtype == torch.bfloat16


def test_generate_from_embeddings_returns_new_tokens_only(llava):
    ids, mask = batch([prompt()])
    embeds = llava.get_input_embeddings()(ids)
    with vlprune.pruned(llava, "fastervlm", ratio=0.75):
        from_ids = gen(llava, ids, mask, pixels(1), max_new_tokens=4)
        with torch.inference_mode():
            from_embeds = llava.generate(inputs_embeds=embeds, attention_mask=mask, pixel_values=pixels(1),
                                         max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def _processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "x", "<image>"] + [f"w{i}" for i in range(58)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_pipeline_on_patched_model(llava):
    from PIL import Image
    from transformers import pipeline

    processor = _processor()
    image = Image.fromarray((torch.rand(64, 80, 3) * 255).to(torch.uint8).numpy())
    text = "w1 w2 <image> w3 w4"
    pipe = pipeline("image-text-to-text", model=llava, processor=processor)
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == N
    with vlprune.pruned(llava, "fastervlm", ratio=0.75) as h:
        result = pipe(images=image, text=text, max_new_tokens=4, do_sample=False)
        assert [r.after for r in h.last] == [4]
        inputs = inputs.to(DEVICE)
        direct = gen(llava, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], max_new_tokens=4)
    new_text = processor.decode(direct[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    generated = result[0]["generated_text"]
    assert generated.endswith(new_text) and generated.startswith(text.replace("<image>", "").split()[0])


def test_every_clip_signal_kind_matches_an_eager_reference(llava_path):
    from vlprune.hooks import Ledger
    from vlprune.builtin_methods.base import Signal
    from vlprune.patches._clip import KINDS, ClipTaps

    eager = load(llava_path, attn_implementation="eager")
    tower = eager.model.vision_tower
    ledger = Ledger()
    requests = [Signal(kind, layer) for kind in KINDS for layer in (0, -1)]
    taps = ClipTaps(tower.encoder.layers, requests, ledger, lambda: True)
    pv = pixels(2)
    with torch.inference_mode():
        out = tower(pv, output_attentions=True, output_hidden_states=True)
    got = taps.take()
    ledger.undo_all()
    with torch.no_grad():
        for layer in (0, 11):
            attn = out.attentions[layer]  # (B, H, 17, 17) eager probabilities
            mod = tower.encoder.layers[layer].self_attn
            x = tower.encoder.layers[layer].layer_norm1(out.hidden_states[layer])
            q = mod.q_proj(x).view(2, 17, 4, 16).transpose(1, 2)
            k = mod.k_proj(x).view(2, 17, 4, 16).transpose(1, 2)
            v = mod.v_proj(x).view(2, 17, 4, 16).transpose(1, 2)
            want = {"cls_attention": attn[:, :, 0, 1:], "attention_received": attn.mean(2)[..., 1:],
                    "keys": k[:, :, 1:], "values": v[:, :, 1:], "cls_query": q[:, :, 0], "cls_key": k[:, :, 0], "cls_value": v[:, :, 0]}
            full_q, full_k = (t.transpose(1, 2).reshape(2, 17, 64) for t in (q, k))  # heads side by side
            want["cls_attention_joint"] = torch.softmax(full_q[:, :1] @ full_k.transpose(1, 2) / 8.0, -1)[..., 1:]
            for kind in KINDS:
                value = got[Signal(kind, layer if layer == 0 else -1)]
                torch.testing.assert_close(value, want[kind].float(), rtol=1e-5, atol=1e-6, msg=f"{kind}@{layer}")


def test_repadded_rows_get_a_mask_when_the_caller_passed_none(llava):
    """Rows of equal length, different image counts, no attention_mask: after pruning they differ in
    length, and the re-padded row must not attend to its pads."""
    long_text = tuple(range(20, 39))
    rows = [prompt(n_images=2, text_before=(1, 7)), prompt(n_images=1, text_before=long_text)]
    assert len(rows[0]) == len(rows[1])
    ids = torch.tensor(rows, device=DEVICE)
    with vlprune.pruned(llava, "fastervlm", ratio=0.5), torch.inference_mode():  # no attention_mask argument
        both = llava(input_ids=ids, pixel_values=pixels(3)).logits
        first = llava(input_ids=ids[:1], pixel_values=pixels(3)[:2]).logits
        second = llava(input_ids=ids[1:], pixel_values=pixels(3)[2:]).logits
    torch.testing.assert_close(both[0, -1], first[0, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1, -1], second[0, -1], rtol=1e-4, atol=1e-5)


def test_a_prompt_without_an_image_keeps_the_callers_ids(llava):
    """Left-padded batch, the second prompt image-free and the longest: the sequence keeps its length after
    pruning, yet the first row was re-padded; generate must still return the caller's ids first."""
    with_image, text_only = prompt(), list(range(20, 20 + len(prompt()) + 3))
    ids, mask = batch([with_image, text_only])
    with vlprune.pruned(llava, "fastervlm", keep=4), torch.inference_mode():
        out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(1), max_new_tokens=2,
                             do_sample=False)
        alone = llava.generate(input_ids=ids[:1, 3:], attention_mask=mask[:1, 3:], pixel_values=pixels(1),
                               max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(out[0, ids.shape[1]:], alone[0, ids.shape[1] - 3:])


def test_a_patched_model_refuses_deepcopy_and_pickle_and_a_plain_one_copies(llava):
    import copy
    import io
    import pickle

    with vlprune.pruned(llava, "fastervlm", keep=4):
        attempts = (lambda: copy.deepcopy(llava), lambda: pickle.dumps(llava), lambda: torch.save(llava, io.BytesIO()))
        for attempt in attempts:
            with pytest.raises(vlprune.VlpruneError, match="cannot be deep-copied or pickled"):
                attempt()
        assert llava.state_dict().keys()  # the weights are still readable while patched
    twin = copy.deepcopy(llava)  # after remove(): an ordinary model again
    assert "__deepcopy__" not in llava.__dict__ and "__reduce_ex__" not in twin.__dict__


def test_each_thread_reads_its_own_records(llava):
    import threading

    seen = {}
    with vlprune.pruned(llava, "fastervlm", keep=4) as h:
        def run(i):
            ids, mask = batch([prompt(text_before=(1, 7, 8 + i))])
            with torch.inference_mode():
                llava(input_ids=ids, attention_mask=mask, pixel_values=pixels(1, seed=20 + i))
            seen[i] = [r.kept.tolist() for r in h.last]
            with torch.inference_mode():  # another call of this thread replaces only this thread's view
                llava(input_ids=ids, attention_mask=mask, pixel_values=pixels(1, seed=20 + i))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(6):
            ids, mask = batch([prompt(text_before=(1, 7, 8 + i))])
            with torch.inference_mode():
                llava(input_ids=ids, attention_mask=mask, pixel_values=pixels(1, seed=20 + i))
            assert seen[i] == [r.kept.tolist() for r in h.last], f"thread {i}"
