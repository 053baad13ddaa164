"""The open_clip patcher (patches/open_clip.py) on tiny random ViTs built from configs, plus the real
ViT-B-32 and ViT-L-14-336 tower geometries (pretrained=None: random weights, nothing downloaded)."""
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import vlprune  # noqa: E402
from vlprune.registry import get_method  # noqa: E402
from vlprune.eval.flops import LengthRecorder, open_clip_vit_flops  # noqa: E402
from vlprune.patches.open_clip import OpenClipViT, kept_tokens  # noqa: E402
from tiny import learned_options  # noqa: E402

N = 16  # patches of a tiny 32 px image with 8 px patches
SERVED = sorted(m for m in vlprune.methods() if not OpenClipViT.support(get_method(m)).startswith("no"))
# tiny towers have 4 blocks: keep every method's layers inside them
OPTIONS = {"fastervlm": {"layer": 1}, "hiprune": {"object_layer": 1}}


def options(model, method):
    return {**OPTIONS.get(method, {}), **learned_options(model, method)}


def tiny_clip(**vision):
    torch.manual_seed(0)
    vcfg = dict(image_size=32, patch_size=8, width=64, head_width=16, layers=4, **vision)
    tcfg = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    return open_clip.CLIP(32, vcfg, tcfg).eval()


def tiny_tower(**kw):
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, width=64, layers=4, heads=4, mlp_ratio=4.0, output_dim=32)
    return VisionTransformer(**{**args, **kw}).eval()


def images(b=2, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def encode(model, x):
    with torch.inference_mode():
        return model.encode_image(x)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(autouse=True)
def _no_leftover_patch(request):
    yield
    for name in ("clip",):
        model = request.node.funcargs.get(name)
        if model is not None and "_vlprune" in model.__dict__:
            model._vlprune.remove()
            pytest.fail("test left a patch installed")


# -- identity, removal, class-level hygiene ---------------------------------------------------------------
@pytest.mark.parametrize("method", SERVED)
def test_ratio_zero_and_remove_are_bit_identical(clip, method):
    x = images()
    before = encode(clip, x)
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in clip.modules()]
    with vlprune.pruned(clip, method, ratio=0, **options(clip, method)) as h:
        assert torch.equal(encode(clip, x), before)
        assert [(r.before, r.after) for r in h.last] == [(N, N), (N, N)]
        assert torch.equal(kept_tokens(h)[1], torch.arange(N).expand(2, -1))
    with vlprune.pruned(clip, method, ratio=0.75, **options(clip, method)) as h:
        pruned = encode(clip, x)
        after_last_block = getattr(h._patcher, "cut", 0) == 4  # prumerge_plus (layer=-1) only trims the tokens
    assert pruned.shape == before.shape and torch.equal(pruned, before) == after_last_block
    assert torch.equal(encode(clip, x), before)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in clip.modules()] == hooks
    assert not {"forward", "_pool", "_vlprune_owner"} & set(clip.visual.__dict__)


def test_nothing_changes_at_class_level_and_disabled_runs_unpruned(clip):
    other = tiny_clip()
    x = images()
    ref = encode(other, x)
    with vlprune.pruned(clip, "fastervlm", keep=4, layer=1) as h:
        assert torch.equal(encode(other, x), ref)  # same class, not patched
        with h.disabled():
            assert torch.equal(encode(clip, x), ref)


def test_patching_the_clip_and_its_tower_replaces_never_stacks(clip):
    x = images()
    h1 = vlprune.patch(clip.visual, "uniform", keep=4)
    h2 = vlprune.patch(clip, "fastervlm", keep=8, layer=1)
    try:
        assert not h1.active and h2.active
        encode(clip, x)
        assert [r.after for r in h2.last] == [8, 8]
    finally:
        h2.remove()
    assert "_vlprune" not in clip.visual.__dict__


# -- counts, order, the tokens handed on --------------------------------------------------------------------
@pytest.mark.parametrize("method", SERVED)
@pytest.mark.parametrize("given,k", [({"ratio": 0.75}, 4), ({"keep": 5}, 5)])
def test_kept_counts_sorted_indices_and_tokens(clip, method, given, k):
    x = images()
    with vlprune.pruned(clip, method, **given, **options(clip, method)) as h:
        rec = LengthRecorder(clip.visual.transformer.resblocks)
        try:
            out = encode(clip, x)
        finally:
            rec.close()
        tokens, kept = kept_tokens(h)
        after_last_block = getattr(h._patcher, "cut", 0) == 4  # prumerge_plus (layer=-1): the output is cut
    assert out.shape == (2, 32)
    assert tokens.shape == (2, k, 64) and kept.shape == (2, k)
    assert [(r.row, r.before, r.after) for r in h.last] == [(0, N, k), (1, N, k)]
    assert (kept[:, 1:] > kept[:, :-1]).all() and kept.min() >= 0 and kept.max() < N  # ascending raster order
    assert rec.vision[-1][1] == (1 + N if after_last_block else 1 + k)  # the last block ran on [CLS] + k


def test_cut_happens_after_the_scored_block(clip):
    """fastervlm layer=L: blocks 0..L see every token, blocks L+1.. see [CLS] + k."""
    with vlprune.pruned(clip, "fastervlm", keep=3, layer=1):
        rec = LengthRecorder(clip.visual.transformer.resblocks)
        try:
            encode(clip, images())
        finally:
            rec.close()
    assert rec.vision == [(2, 17), (2, 17), (2, 4), (2, 4)]


def test_signal_free_methods_cut_before_the_first_block(clip):
    with vlprune.pruned(clip, "uniform", keep=4):
        rec = LengthRecorder(clip.visual.transformer.resblocks)
        try:
            encode(clip, images())
        finally:
            rec.close()
    assert rec.vision == [(2, 5)] * 4


def test_tokens_are_what_open_clip_returns_with_output_tokens():
    tower = tiny_tower(output_tokens=True)
    x = images()
    with vlprune.pruned(tower, "fastervlm", keep=4, layer=1) as h:
        with torch.inference_mode():
            pooled, tokens = tower(x)
        assert torch.equal(tokens, kept_tokens(h)[0])
        assert pooled.shape == (2, 32) and tokens.shape == (2, 4, 64)


def test_kept_tokens_equal_a_manual_run_on_the_survivors(clip):
    """Independent of the hooks: run the blocks by hand, dropping the recorded patches after block 1."""
    v = clip.visual
    x = images()
    with vlprune.pruned(clip, "fastervlm", keep=4, layer=1) as h:
        out = encode(clip, x)
        tokens, kept = kept_tokens(h)
    with torch.inference_mode():
        hidden = v._embeds(x)
        for i, block in enumerate(v.transformer.resblocks):
            if i == 2:
                patches = hidden[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
                hidden = torch.cat([hidden[:, :1], patches], 1)
            hidden = block(hidden)
        pooled, ref_tokens = v._pool(hidden)
        ref = pooled @ v.proj
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=1e-6)


# -- the [CLS] row -------------------------------------------------------------------------------------------
def full_attention_cls_rows(visual, x):
    """(blocks, B, heads, N) [CLS] rows from nn.MultiheadAttention run with need_weights=True (N x N)."""
    rows = []

    def grab(attn, args, _kwargs, _out):
        _, w = attn.forward(args[0], args[1], args[2], need_weights=True, average_attn_weights=False)  # no hooks
        rows.append(w[:, :, 0, 1:])

    handles = [b.attn.register_forward_hook(grab, with_kwargs=True) for b in visual.transformer.resblocks]
    try:
        with torch.no_grad():
            visual(x)
    finally:
        for hd in handles:
            hd.remove()
    return rows


@pytest.mark.parametrize("layer", [0, 2])
def test_cls_row_equals_the_full_attention_weights(clip, layer):
    x = images()
    ref = full_attention_cls_rows(clip.visual, x)[layer]
    with vlprune.pruned(clip, "fastervlm", keep=4, layer=layer) as h:
        encode(clip, x)
        scores = torch.stack([r.scores for r in h.last])
    torch.testing.assert_close(scores, ref.mean(1), rtol=0, atol=1e-6)  # fastervlm: head mean of the row
    assert not torch.equal(ref[:, 0], ref[:, 1])  # heads differ: the mean is a real check


def test_cls_row_per_head_and_keys_from_the_fused_projection(clip):
    """The taps themselves, head by head, against need_weights=True and a hand-split in-projection."""
    from vlprune.hooks import Ledger
    from vlprune.builtin_methods.base import Signal
    from vlprune.patches._clip import OpenClipTaps

    x = images()
    ref = full_attention_cls_rows(clip.visual, x)[3]
    ledger, inputs = Ledger(), []
    blocks = clip.visual.transformer.resblocks
    taps = OpenClipTaps(blocks, [Signal("cls_attention", -1), Signal("keys", -1), Signal("cls_value", -1)],
                          ledger, lambda: True)
    ledger.hook(blocks[3].attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])))
    try:
        with torch.no_grad():
            clip.visual(x)
    finally:
        ledger.undo_all()
    got = taps.take()
    torch.testing.assert_close(got[Signal("cls_attention", -1)], ref, rtol=0, atol=1e-6)
    w, b = blocks[3].attn.in_proj_weight, blocks[3].attn.in_proj_bias
    keys = (inputs[0] @ w[64:128].T + b[64:128]).view(2, 17, 4, 16).transpose(1, 2)
    values = (inputs[0] @ w[128:].T + b[128:]).view(2, 17, 4, 16).transpose(1, 2)
    torch.testing.assert_close(got[Signal("keys", -1)], keys[:, :, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[Signal("cls_value", -1)], values[:, :, 0], rtol=0, atol=1e-6)


def test_qk_norm_blocks_use_their_norms_in_the_row():
    """open_clip's custom Attention with qk_norm: the row must see ln_q/ln_k as the attention does."""
    tower = tiny_tower(qk_norm=True)
    attn = tower.transformer.resblocks[1].attn
    with torch.no_grad():  # give the norms weights that matter
        attn.ln_q.weight.uniform_(0.5, 2.0), attn.ln_k.weight.uniform_(0.5, 2.0)
    seen = []
    hd = attn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = images()
    try:
        with vlprune.pruned(tower, "fastervlm", keep=4, layer=1) as h:
            with torch.no_grad():
                tower(x)
            scores = torch.stack([r.scores for r in h.last])
    finally:
        hd.remove()
    with torch.no_grad():
        q, k, _ = torch.nn.functional.linear(seen[0], attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        q = attn.ln_q(q.view(2, 17, 4, 16).transpose(1, 2))
        k = attn.ln_k(k.view(2, 17, 4, 16).transpose(1, 2))
    row = torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5, -1)[:, :, 0, 1:]
    torch.testing.assert_close(scores, row.mean(1), rtol=0, atol=1e-6)


# -- batches --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastervlm", "flowcut", "visionzip", "pool"])
def test_batch_of_two_equals_single_images(clip, method):
    x = images(seed=3)
    with vlprune.pruned(clip, method, keep=5, **options(clip, method)) as h:
        both = encode(clip, x)
        tok_both, kept_both = kept_tokens(h)
        singles, tok_single, kept_single = [], [], []
        for i in range(2):
            singles.append(encode(clip, x[i:i + 1]))
            tokens, kept = kept_tokens(h)
            tok_single.append(tokens), kept_single.append(kept)
    assert torch.equal(kept_both, torch.cat(kept_single))
    if method != "pool":  # pool's cells are the same for every image
        assert not torch.equal(kept_both[0], kept_both[1])  # positions per image
    # the unpatched tower itself is batch-invariant only to float rounding (BLAS paths), not bit for bit
    torch.testing.assert_close(both, torch.cat(singles), rtol=0, atol=1e-5)
    torch.testing.assert_close(tok_both, torch.cat(tok_single), rtol=0, atol=1e-5)


def test_flowcut_batch_with_different_counts_equals_single_images(monkeypatch):
    """FlowCut runs a batch in one pass: images whose adaptive counts differ are padded and the padding
    masked, so each image gets what it gets alone (a sharpened 8-block tower, 64 patches, makes the
    counts differ; an unmasked padding changes them)."""
    from vlprune.builtin_methods.flowcut import FlowCut

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=64, patch_size=8, width=64, layers=8, heads=4, mlp_ratio=4.0,
                              output_dim=32, output_tokens=True).eval()
    with torch.no_grad():
        for block in tower.transformer.resblocks:
            block.attn.in_proj_weight[:128] *= 3  # q and k: peaked [CLS] attention, entropy well below its max
    counts, step = [], FlowCut.encoder_step
    monkeypatch.setattr(FlowCut, "encoder_step", lambda self, *a: counts.append(step(self, *a)[2]) or step(self, *a))
    x = images(b=3, size=64, seed=3)
    with vlprune.pruned(tower, "flowcut", keep=16) as h, torch.inference_mode():
        pooled, tokens = tower(x)
        kept = kept_tokens(h)[1]
        singles = [(tower(x[i : i + 1]), kept_tokens(h)[1]) for i in range(3)]
    assert any(len(set(c)) > 1 for c in counts)  # the batch really was ragged
    assert torch.equal(kept, torch.cat([s[1] for s in singles])) and tokens.shape[1] == 16
    torch.testing.assert_close(pooled, torch.cat([s[0][0] for s in singles]), rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, torch.cat([s[0][1] for s in singles]), rtol=0, atol=1e-5)


# -- pooling variants and bad input ----------------------------------------------------------------------
def test_avg_pool_averages_the_survivors():
    tower = tiny_tower(pool_type="avg", output_tokens=True)
    with vlprune.pruned(tower, "fastervlm", keep=4, layer=1) as h:
        with torch.inference_mode():
            pooled, tokens = tower(images())
    torch.testing.assert_close(pooled, tokens.mean(1) @ tower.proj, rtol=0, atol=1e-6)
    assert [r.after for r in h.last] == [4, 4]


@pytest.mark.parametrize("method", sorted(set(vlprune.methods()) - set(SERVED)))
def test_methods_needing_a_language_model_are_refused_with_the_reason(clip, method):
    cls = get_method(method)
    kw = {"ratio": 0.5} if cls.budgeted and getattr(cls, "prunes", True) else {}
    # decoding methods (prunes=False) may be refused by the core's Patcher first, in its own words
    needle = rf"method='{method}' is not served on CLIP \(OpenClipViT\): .*language model.*methods served there: "
    with pytest.raises(vlprune.VlpruneError, match=needle):
        vlprune.patch(clip, method, **kw)
    assert "_vlprune" not in clip.__dict__ and "forward" not in clip.visual.__dict__


@pytest.mark.parametrize("kw, needle", [
    ({"attentional_pool": True}, "attentional pooling"),
    ({"pool_type": "none"}, "pool_type='none' is not supported"),
])
def test_unsupported_towers_are_refused(kw, needle):
    with pytest.raises(vlprune.VlpruneError, match=needle):
        vlprune.patch(tiny_tower(**kw), "fastervlm", ratio=0.5)


def test_bad_layers_and_calls_give_clear_errors(clip):
    with pytest.raises(vlprune.VlpruneError, match=r"layer=10 is out of range for a 4-layer.*allowed -4\.\.3"):
        vlprune.patch(clip, "fastervlm", ratio=0.5, layer=10)
    with vlprune.pruned(clip, "fastervlm", ratio=0.5, layer=1) as h:
        with pytest.raises(vlprune.VlpruneError, match="no pruned call yet"):
            kept_tokens(h)
    with pytest.raises(vlprune.VlpruneError, match="kept_tokens.*open_clip"):
        kept_tokens(object())
    tower = tiny_tower(patch_dropout=0.5).train()
    with vlprune.pruned(tower, "fastervlm", ratio=0.5, layer=1):
        with pytest.raises(vlprune.VlpruneError, match="training mode with patch_dropout"):
            tower(images())


# -- FLOPs ----------------------------------------------------------------------------------------------------
def measured(clip, x, handle=None):
    rec = LengthRecorder(clip.visual.transformer.resblocks)
    try:
        with FlopCounterMode(display=False) as counter:  # grad on: nn.MultiheadAttention's plain path
            clip.encode_image(x)
    finally:
        rec.close()
    signal = handle._patcher.signal_macs if handle is not None else 0
    return open_clip_vit_flops(clip.visual, rec, signal), rec, counter.get_total_flops()


def test_flops_match_a_hand_count_and_torch_flop_counter(clip):
    x = images()
    d, i = 64, 256
    with vlprune.pruned(clip, "fastervlm", keep=4, layer=1) as h:
        flops, rec, torch_count = measured(clip, x, h)
    assert rec.vision == [(2, 17), (2, 17), (2, 5), (2, 5)]

    def block(n):  # q, k, v, o; scores and weighted values; MLP (multiply-accumulates)
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * i

    embed = 16 * (3 * 8 * 8) * d  # the 8x8 patch conv, per image
    signals = (1 + 17) * d * d + 17 * d  # [CLS] query and 17 keys from in_proj, then the row q.K^T
    hand = 2 * 2 * (embed + 2 * block(17) + 2 * block(5) + d * 32 + signals)
    assert flops["total"] == hand
    assert flops["signals"] == 2 * 2 * signals
    # torch's counter sees the same matrix products except the attention core (SDPA is not counted on CPU)
    core = sum(2 * b * 2 * n * n * d for b, n in rec.vision)
    assert torch_count == flops["total"] - core


def test_vit_b_32_ratio_075_from_layer_6_is_cheaper_with_the_same_shape():
    """ViT-B-32 geometry: 7x7 = 49 patches, 12 blocks. fastervlm layer=5 scores with block 5, so blocks
    6..11 run on [CLS] + 12 tokens instead of 50."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    x = images(b=2, size=224)
    with torch.inference_mode():
        ref = model.encode_image(x)
    full, rec_full, torch_full = measured(model, x)
    with vlprune.pruned(model, "fastervlm", ratio=0.75, layer=5) as h:
        with torch.inference_mode():
            out = model.encode_image(x)
        pruned, rec, torch_pruned = measured(model, x, h)
        assert [(r.before, r.after) for r in h.last] == [(49, 12), (49, 12)]
        assert kept_tokens(h)[0].shape == (2, 12, 768)
    assert out.shape == ref.shape == (2, 512)
    assert rec_full.vision == [(2, 50)] * 12
    assert rec.vision == [(2, 50)] * 6 + [(2, 13)] * 6
    print(f"\nViT-B-32 encode_image, batch 2: unpruned {full['total'] / 1e9:.3f} GFLOPs, "
          f"fastervlm ratio 0.75 from block 6 {pruned['total'] / 1e9:.3f} GFLOPs "
          f"(signals {pruned['signals'] / 1e9:.4f}), ratio {pruned['total'] / full['total']:.3f}")
    assert pruned["total"] < 0.7 * full["total"]
    assert torch_pruned < 0.7 * torch_full  # torch's own counter agrees


def test_vit_l_14_336_geometry_576_to_k():
    """LLaVA-1.5's tower geometry (24 blocks, 1024 wide, 336 px / 14 px = 576 patches), tower only."""
    cfg = open_clip.get_model_config("ViT-L-14-336")["vision_cfg"]
    torch.manual_seed(0)
    tower = VisionTransformer(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["width"],
                              layers=cfg["layers"], heads=cfg["width"] // 64, mlp_ratio=4.0, output_dim=768).eval()
    x = images(b=1, size=336)
    for method, kw, k in [("fastervlm", {"layer": 5}, 64), ("flowcut", {}, 144)]:  # blocks 6.. at 65 tokens
        with vlprune.pruned(tower, method, keep=k, **kw) as h:
            rec = LengthRecorder(tower.transformer.resblocks)
            try:
                with torch.inference_mode():
                    out = tower(x)
            finally:
                rec.close()
            tokens, kept = kept_tokens(h)
        assert out.shape == (1, 768) and tokens.shape == (1, k, 1024)
        assert [(r.before, r.after) for r in h.last] == [(576, k)]
        assert (kept[0, 1:] > kept[0, :-1]).all() and kept.max() < 576
        lengths = [n for _, n in rec.vision]
        assert lengths[0] == 577 and lengths[-1] == 1 + k
        assert lengths == sorted(lengths, reverse=True)
