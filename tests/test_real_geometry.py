"""LLaVA-1.5's real vision geometry (CLIP ViT-L/14-336: 24 layers, 577 tokens), random weights, tiny LM."""
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import vlprune
from tiny import DEVICE, IMAGE_TOKEN, batch, pixels, prompt, tiny_text
from vlprune.eval import configs


@pytest.fixture(scope="module")
def vit_l_llava():
    cfg = configs.llava15_config(configs.CLIP_L_336, dict(tiny_text(1), max_position_embeddings=1024), IMAGE_TOKEN)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval().to(DEVICE)
    with torch.no_grad():  # sharpen the random attention so the top-64 boundary is not a near-tie
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def test_fastervlm_keep64_matches_eager_layer22_cls_row(vit_l_llava):
    model = vit_l_llava
    ids, mask = batch([prompt(n_patches=576)])
    pv = pixels(1, size=336)
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attn = tower(pv, output_attentions=True).attentions[22]  # 0-based layer 22 == layer -2
    finally:
        tower.set_attn_implementation("sdpa")
    row = attn[0, :, 0, 1:].mean(0)  # head mean of the [CLS] row over the 576 patch keys
    want = row.topk(64).indices.sort().values
    boundary = row.sort(descending=True).values
    assert boundary[63] - boundary[64] > 1e-6, "reference ranking must not hinge on a near-tie"

    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with vlprune.pruned(model, "fastervlm", keep=64) as h, torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, pixel_values=pv)
            assert tower.config._attn_implementation == "sdpa"
    finally:
        hook.remove()
    rec = h.last[0]
    assert (rec.before, rec.after) == (576, 64)
    assert seen == [ids.shape[1] - 576 + 64]
    assert rec.kept.tolist() == want.tolist()
    torch.testing.assert_close(rec.scores, row, rtol=1e-4, atol=1e-7)
