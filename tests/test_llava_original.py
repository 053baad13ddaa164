"""The original LLaVA code (llava-torch) patcher: loading as users do, generate under transformers 5,
positions, labels, max_length, errors, import laziness, and CLIP ViT-L/14-336 geometry.

The promises shared with every patcher (token counts, identity, remove, batch = singles, cache) run in
test_contract.py over the ``llava_original`` family.
"""
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("llava", reason="the original LLaVA code (llava-torch) is not installed")

import tiny_original as to  # noqa: E402
import vlprune  # noqa: E402
from tiny import DEVICE, batch, fail_if_left_patched, pixels  # noqa: E402
from vlprune.patches.llava_original import LlavaOriginal  # noqa: E402

N = to.N
LM_LEN = 7 + N  # to.prompt(): 6 text tokens + placeholder -> 16 features, + the token after it


@pytest.fixture(scope="module")
def orig_path(tmp_path_factory):
    return to.build(tmp_path_factory.mktemp("tiny-llava-original"))


@pytest.fixture(scope="module")
def _shared(orig_path):
    return to.load(orig_path)


@pytest.fixture
def orig(_shared):
    yield _shared
    fail_if_left_patched(_shared)


def run(model, ids, mask, images, **kw):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, images=images, **kw)


def gen(model, ids, mask, images, **kw):
    kw.setdefault("max_new_tokens", 4)
    with torch.inference_mode():
        return model.generate(ids, images=images, attention_mask=mask, do_sample=False, **kw)


class LMCalls:
    """What reaches the Llama decoder (``model.model``): embeddings and position ids, per call."""

    def __init__(self, model):
        self.calls = []
        self._h = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, _args, kwargs):
        self.calls.append({"embeds": kwargs.get("inputs_embeds"), "position_ids": kwargs.get("position_ids")})

    def close(self):
        self._h.remove()


def test_every_method_is_served_as_on_llava_1_5():
    from vlprune.registry import get_method

    assert all(LlavaOriginal.support(get_method(m)) == "yes" for m in vlprune.methods())


def test_importing_vlprune_does_not_import_llava():
    code = "import sys, vlprune; vlprune.methods(); import vlprune.patches.llava_original; assert 'llava' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_loaded_as_users_do_in_fp16_generates_under_transformers_5(orig_path):
    """load_pretrained_model gives fp16; generate (which calls forward(cache=...)) works while patched."""
    model = to.load(orig_path, float32=False)
    assert model.dtype == torch.float16
    ids, mask = batch([to.prompt()])
    images = pixels(1).half()
    ref = run(model, ids, mask, images).logits
    with vlprune.pruned(model, "fastervlm", ratio=0.75) as h:
        out = gen(model, ids, mask, images)
        assert out.shape == (1, 4)  # the original generate returns only the new ids
        assert [(r.before, r.after) for r in h.last] == [(N, 4)]
        assert run(model, ids, mask, images).logits.shape[1] == LM_LEN - 12
    assert torch.equal(run(model, ids, mask, images).logits, ref)


@pytest.mark.parametrize("method", ["fastervlm", "fastv"])
def test_generate_equals_greedy_decoding_of_the_unpatched_forward_at_ratio_zero(orig, method):
    ids, mask = batch([to.prompt(text_before=(1, 4, 5, 6)), to.prompt()])
    images = pixels(2)
    ref = to.greedy(orig, ids, mask, images, 6)
    with vlprune.pruned(orig, method, ratio=0.0):
        assert torch.equal(gen(orig, ids, mask, images, max_new_tokens=6), ref)


def test_positions_contiguous_and_original(orig):
    ids, mask = batch([to.prompt()])
    start = 3  # the placeholder's position: the image's first feature
    for positions in ("contiguous", "original"):
        rec = LMCalls(orig)
        try:
            with vlprune.pruned(orig, "fastervlm", keep=4, positions=positions) as h:
                run(orig, ids, mask, pixels(1))
                gen(orig, ids, mask, pixels(1), max_new_tokens=3)
                kept = h.last[0].kept
        finally:
            rec.close()
        fwd, prefill, step = rec.calls[0], rec.calls[1], rec.calls[2]
        if positions == "contiguous":
            assert fwd["position_ids"] is None  # the LM counts 0..L'-1 itself, as unpatched
            assert prefill["position_ids"][0].tolist() == list(range(LM_LEN - 12))
            assert step["position_ids"][0].tolist() == [LM_LEN - 12]
        else:
            want = list(range(start)) + [start + int(i) for i in kept] + list(range(start + N, LM_LEN))
            assert fwd["position_ids"][0].tolist() == want
            assert prefill["position_ids"][0].tolist() == want
            assert step["position_ids"][0].tolist() == [LM_LEN]  # decoding continues after the unpruned prompt


def test_positions_original_in_a_left_padded_forward_count_padding_as_unpatched(orig):
    """Without position ids the unpatched LM numbers every column of the padded batch; so do survivors."""
    ids, mask = batch([to.prompt(text_before=(1, 4, 5, 6, 7)), to.prompt()])
    rec = LMCalls(orig)
    try:
        with vlprune.pruned(orig, "uniform", keep=4, positions="original") as h:
            run(orig, ids, mask, pixels(2))
    finally:
        rec.close()
    pos = rec.calls[0]["position_ids"]
    full = LM_LEN + 2  # the longer prompt's unpruned length; the other is padded by 2 on the left
    kept = h.last[1].kept
    want = [2 + p for p in list(range(3)) + [3 + int(i) for i in kept] + list(range(3 + N, LM_LEN))]
    assert pos[1, -len(want):].tolist() == want
    assert pos[0, -1].item() == full - 1


def test_max_length_counts_the_unpruned_sequence(orig):
    ids, mask = batch([to.prompt()])
    with vlprune.pruned(orig, "fastervlm", keep=4):
        out = gen(orig, ids, mask, pixels(1), max_new_tokens=None, max_length=LM_LEN + 3)
    assert out.shape == (1, 3)


@pytest.mark.parametrize("method", ["fastervlm", "fastv"])
def test_labels_are_shortened_with_the_sequence(orig, method):
    ids, mask = batch([to.prompt()])
    labels = ids.masked_fill(ids < 0, -100)
    with vlprune.pruned(orig, method, keep=4) as h:
        out = run(orig, ids, mask, pixels(1), labels=labels)
        kept = h.last[0].kept.tolist()
    text = labels[0].tolist()
    short = text[:3] + [-100] * len(kept) + text[4:]  # the original code labels image features -100
    assert out.logits.shape[1] == len(short)
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), torch.tensor(short[1:], device=DEVICE),
                                             ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_lm_receives_the_projected_survivors(orig):
    ids, mask = batch([to.prompt()])
    images = pixels(1)
    rec = LMCalls(orig)
    try:
        with vlprune.pruned(orig, "fastervlm", keep=5) as h:
            run(orig, ids, mask, images)
    finally:
        rec.close()
    with torch.inference_mode():
        feats = orig.model.mm_projector(orig.model.vision_tower(images))[0]  # (N, D), unpatched
        text = orig.model.embed_tokens(ids[0, 4:])
    got = rec.calls[0]["embeds"][0]
    torch.testing.assert_close(got[3:8], feats[h.last[0].kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[8:], text)


def test_disabled_and_text_only_calls_pass_through(orig):
    ids, mask = batch([to.prompt()])
    ref = run(orig, ids, mask, pixels(1)).logits
    text_ids = torch.tensor([[1, 7, 8, 9]], device=DEVICE)
    text_ref = run(orig, text_ids, None, None).logits
    with vlprune.pruned(orig, "fastervlm", keep=4) as h:
        with h.disabled():
            assert torch.equal(run(orig, ids, mask, pixels(1)).logits, ref)
        assert torch.equal(run(orig, text_ids, None, None).logits, text_ref)


def test_errors_are_clear(orig):
    ids, mask = batch([to.prompt()])
    with vlprune.pruned(orig, "fastervlm", keep=4):
        with pytest.raises(vlprune.VlpruneError, match="images holds 2 images; the prompts need 1"):
            run(orig, ids, mask, pixels(2))
        with pytest.raises(vlprune.VlpruneError, match=r"one \(B, 3, H, W\) tensor"):
            run(orig, ids, mask, [pixels(1)[0]])
    tower = orig.model.get_vision_tower()
    tower.select_feature = "cls_patch"
    try:
        with pytest.raises(vlprune.VlpruneError, match="mm_vision_select_feature='cls_patch'"):
            vlprune.patch(orig, "fastervlm", keep=4)
    finally:
        tower.select_feature = "patch"
    assert "_vlprune" not in orig.__dict__ and "forward" not in orig.__dict__
    with vlprune.pruned(orig, "damro"):  # served (test_method_damro_families.py), but only for one images tensor
        with pytest.raises(vlprune.VlpruneError, match=r"one \(B, 3, H, W\) tensor"):
            gen(orig, ids, mask, [pixels(1)[0]])


def test_clip_vit_l_336_geometry_576_to_64_in_raster_order(tmp_path):
    """CLIP ViT-L/14-336 with random weights and a 1-layer LM: 576 tokens -> 64, kept = the top 64 of the
    eager [CLS] row at layer -2 (0-based 22), ascending."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    vision.save_pretrained(tmp_path)  # mm_vision_tower names a folder with this config; weights set below
    cfg = LlavaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0)
    cfg.update({"mm_vision_tower": str(tmp_path), "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlavaLlamaForCausalLM(cfg).eval()
    tower = model.get_vision_tower()
    tower.vision_tower = CLIPVisionModel._from_config(vision, attn_implementation="sdpa").eval()
    tower.is_loaded = True
    with torch.no_grad():  # sharpen the random attention so the top-64 boundary is not a near-tie
        for layer in tower.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    model.to(DEVICE)
    images = pixels(1, size=336)
    tower.vision_tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attn = tower.vision_tower(images, output_attentions=True).attentions[22]
    finally:
        tower.vision_tower.set_attn_implementation("sdpa")
    row = attn[0, :, 0, 1:].mean(0)
    want = row.topk(64).indices.sort().values
    ranked = row.sort(descending=True).values
    assert ranked[63] - ranked[64] > 1e-6, "the reference ranking must not hinge on a near-tie"

    ids, mask = batch([to.prompt()])
    rec = LMCalls(model)
    try:
        with vlprune.pruned(model, "fastervlm", keep=64) as h:
            run(model, ids, mask, images)
    finally:
        rec.close()
    r = h.last[0]
    assert (r.before, r.after) == (576, 64)
    assert rec.calls[0]["embeds"].shape[1] == ids.shape[1] - 1 + 64
    assert r.kept.tolist() == want.tolist()
    torch.testing.assert_close(r.scores, row, rtol=1e-4, atol=1e-7)
