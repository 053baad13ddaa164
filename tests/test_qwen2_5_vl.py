"""HF Qwen2.5-VL patcher (patches/qwen2_5_vl.py): the contract promises for every supported method on a tiny
random Qwen2.5-VL (windowed vision blocks, 2x2 merger, M-RoPE; inputs from a real Qwen2_5_VLProcessor with a
WordLevel tokenizer), M-RoPE positions of survivors, window -> raster mapping, signal values, errors, and the
Qwen2.5-VL-7B vision geometry."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import vlprune
from tiny import DEVICE, fail_if_left_patched, learned_options, sharpen
from vlprune.eval import configs
from vlprune.patches._qwen_vision import window_layout
from vlprune.patches.qwen2_5_vl import Qwen2_5_VL
from vlprune.registry import get_method

PAD, BOS, EOS, VSTART, VEND, IMG, VID = 0, 1, 2, 3, 4, 5, 6
SPECIAL = ["<pad>", "<s>", "</s>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "what is in the picture ? a cat dog left right up down red blue green how many".split()
VOCAB = 64
IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"
# pixel sizes -> patch grids (14 px patches) -> merged tokens: 8x8 -> 16, 6x10 -> 15, 10x14 -> 35
SQUARE, WIDE, BIG = (112, 112), (84, 140), (140, 196)

SUPPORTED = [m for m in sorted(vlprune.methods()) if not Qwen2_5_VL.support(get_method(m)).startswith("no")]


def qwen_config(depth=4, fullatt=(1, 3), window=56, lm_layers=4, vision_hidden=32, heads=2, out_hidden=64,
                lm_heads=4, lm_kv_heads=2, mrope=(2, 3, 3), lm_intermediate=128, vision_intermediate=None):
    """Blocks 0 and 2 windowed, 1 and 3 full (as in 7B, block -2 is windowed and -1 full); window=56 px holds
    2 x 2 merged units, so 4 x 4- and 3 x 5-unit grids really split into (ragged) windows."""
    vision = dict(depth=depth, hidden_size=vision_hidden, num_heads=heads, intermediate_size=vision_intermediate or 2 * vision_hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window,
                  fullatt_block_indexes=list(fullatt), in_channels=3, tokens_per_second=2)
    text = dict(vocab_size=VOCAB, hidden_size=out_hidden, intermediate_size=lm_intermediate, num_hidden_layers=lm_layers,
                num_attention_heads=lm_heads, num_key_value_heads=lm_kv_heads, max_position_embeddings=4096,
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope)})
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return configs.qwen2_5_vl_config(vision, text, ids)


def build_qwen(path=None, attn="sdpa", seed=0, **cfg):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(**cfg), attn_implementation=attn)
    sharpen(model)
    model.generation_config.suppress_tokens = [IMG, VID]
    model.generation_config.pad_token_id = PAD
    model.eval()
    if path is None:
        return model.to(DEVICE)
    model.save_pretrained(path)
    return load(path, attn_implementation=attn)


def load(path, **kwargs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs).eval().to(DEVICE)


@functools.lru_cache(maxsize=2)
def processor(max_pixels=28 * 28 * 64):
    """A real Qwen2_5_VLProcessor: the Qwen2-VL image processor and a WordLevel tokenizer with Qwen's tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({w: len(SPECIAL) + i for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=SPECIAL[3:], padding_side="left")
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=images, tokenizer=fast, video_processor=Qwen2VLVideoProcessor())


def picture(size, seed):
    h, w = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def inputs(*rows, padding_side="left", max_pixels=28 * 28 * 64):
    """rows: (text before, [image sizes], text after) -> the processor's batch (left padding by default)."""
    texts, pics = [], []
    for before, sizes, after in rows:
        texts.append(" ".join(["<s>", before] + [IMAGE] * len(sizes) + [after]))
        pics += [picture(s, seed=sum(s)) for s in sizes]  # same size, same picture, in any batch
    proc = processor(max_pixels)
    proc.tokenizer.padding_side = padding_side
    out = proc(images=pics or None, text=texts, return_tensors="pt", padding=True)
    return {k: v.to(DEVICE) for k, v in out.items()}


def run(model, batch, **kw):
    with torch.inference_mode():
        return model(**batch, **kw)


def gen(model, batch, **kw):
    kw.setdefault("max_new_tokens", 4)
    with torch.inference_mode():
        return model.generate(**batch, do_sample=False, **kw)


# the tiny tower has 4 blocks: HiPrune's default object layer (8, a CLIP ViT-L middle layer) does not exist
OPTIONS = {"hiprune": {"object_layer": 1}}


def budget(method, model=None, **kw):
    """The budget keywords a method takes (none if not budgeted), plus its options for the tiny tower and,
    given the model, a learned method's weights for it."""
    learned = learned_options(model, method) if model is not None else {}
    return {**(kw if get_method(method).budgeted else {}), **OPTIONS.get(method, {}), **learned}


class LMInputs:
    """Records what reaches the Qwen2.5-VL language model: embeddings and position ids."""

    def __init__(self, model):
        self.calls = []
        self._h = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, _args, kwargs):
        self.calls.append({"embeds": kwargs["inputs_embeds"], "position_ids": kwargs.get("position_ids"),
                           "mask": kwargs.get("attention_mask")})

    def close(self):
        self._h.remove()


def image_embeds(model, batch):
    """The merged tokens of every image (raster order of each merged grid), as the unpatched model makes them."""
    with torch.inference_mode():
        return model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output


@pytest.fixture(scope="session")
def qwen_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2_5_vl")
    build_qwen(path)
    return path


@pytest.fixture(scope="session")
def _shared_qwen(qwen_path):
    return load(qwen_path)


@pytest.fixture
def qwen(_shared_qwen):
    yield _shared_qwen
    fail_if_left_patched(_shared_qwen)


TWO_SIZES = (("what is", [SQUARE], "a cat"), ("how many", [WIDE], "red blue green ?"))


# -- the support table ------------------------------------------------------------------------------
def test_support_follows_from_what_each_method_asks():
    verdict = {m: Qwen2_5_VL.support(get_method(m)) for m in vlprune.methods()}
    assert verdict["damro"].startswith("no: contrastive decoding ranks outlier tokens by the [CLS]")
    assert verdict["fastervlm"] == verdict["vtc_cls"] == verdict["tcc"] == verdict["holov"] == (
        "substitute: [CLS] attention -> the mean attention each merged token receives (as HoloV and HiPrune do on "
        "Qwen); in windowed blocks, such as the default layer -2, within windows (layer=-1: the last, "
        "full-attention block)")
    assert verdict["flowcut"].startswith("substitute: [CLS] -> a global token") and ";" not in verdict["flowcut"].split(
        "recipe)")[0]
    assert verdict["prumerge_plus"] == ("substitute: [CLS] query/key -> a global token: the mean of the image's patch "
                                        "queries/keys; merges average merged (projected) tokens")
    assert verdict["visionzip"].endswith("; merges average merged (projected) tokens")
    assert all(verdict[m] == "yes" for m in ("divprune", "hiprune", "fastv", "random", "uniform", "visual_exit"))


def test_processor_layout_is_what_the_tests_assume(qwen):
    batch = inputs(*TWO_SIZES)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 10]]
    assert (batch["input_ids"] == IMG).sum(1).tolist() == [16, 15]
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == IMG)
    layout = window_layout(batch["image_grid_thw"], qwen.config.vision_config)
    assert layout["window_index"].tolist() != list(range(31)), "windows must really permute the units"


# -- the contract, for every supported method -------------------------------------------------------
@pytest.mark.parametrize("method", SUPPORTED)
def test_token_counts_per_image_of_different_sizes(qwen, method):
    batch = inputs(("what is", [SQUARE], "a cat"), ("how many", [BIG], "red ?"))
    rec = LMInputs(qwen)
    try:
        with vlprune.pruned(qwen, method, **budget(method, qwen, ratio=0.75)) as h:
            run(qwen, batch)
    finally:
        rec.close()
    k1, k2 = (4, 9) if get_method(method).budgeted else (0, 0)
    if h.method.llm_plan(4) is not None:  # atp: each image keeps its own count (checked in test_contract)
        k1, k2 = (r.counts[max(r.counts)] for r in h.last)
    assert [(r.row, r.before, r.after) for r in h.last] == [(0, 16, k1), (1, 35, k2)]
    for r in h.last:
        kept = r.kept.tolist()
        assert len(kept) == r.after and kept == sorted(set(kept)) and all(0 <= i < r.before for i in kept)
    if get_method(method).stage != "llm":
        real = batch["attention_mask"].sum(1) - torch.tensor([16 - k1, 35 - k2], device=DEVICE)
        assert rec.calls[0]["embeds"].shape[1] == int(real.max())
        assert (rec.calls[0]["mask"].sum(1) == real).all()


@pytest.mark.parametrize("generating", [False, True])
def test_every_per_position_tensor_is_shortened_consistently(qwen, generating):
    """input_ids, attention_mask, mm_token_type_ids, position ids: one length, image types at image ids."""
    batch = inputs(("what is", [SQUARE], "a cat"), ("how many", [BIG], "red blue ?"))  # re-padded after pruning
    seen = []

    def grab(_m, _args, kwargs):
        seen.append({k: kwargs.get(k) for k in ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids")})

    hook = qwen.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vlprune.pruned(qwen, "fastervlm", keep=5):
            gen(qwen, batch, max_new_tokens=2) if generating else run(qwen, batch)
    finally:
        hook.remove()
    first = seen[0]
    ids = first["input_ids"]
    assert ids.shape == first["attention_mask"].shape == first["mm_token_type_ids"].shape
    assert first["position_ids"].shape[1:] == ids.shape
    assert torch.equal(first["mm_token_type_ids"].bool(), ids == IMG)
    assert ((ids == IMG) & first["attention_mask"].bool()).sum(1).tolist() == [5, 5]
    assert first["attention_mask"].sum(1).tolist() == [12, 13] and first["attention_mask"][0, 0] == 0
    assert first["position_ids"].shape[0] == (4 if generating else 3)  # generate() adds its text row


@pytest.mark.parametrize("method", SUPPORTED)
def test_generate_keeps_output_contract(qwen, method):
    batch = inputs(TWO_SIZES[0])
    n = batch["input_ids"].shape[1]
    with vlprune.pruned(qwen, method, **budget(method, qwen, ratio=0.75)):
        out = gen(qwen, batch, max_new_tokens=4)
        assert out.shape == (1, n + 4) and torch.equal(out[:, :n], batch["input_ids"])
        assert torch.equal(gen(qwen, batch, max_new_tokens=4, return_dict_in_generate=True).sequences, out)
        assert gen(qwen, batch, max_new_tokens=None, max_length=n + 3).shape[1] == n + 3


@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_of_different_image_sizes_equals_single_runs(qwen, method):
    rows = TWO_SIZES + (("left right", [SQUARE, WIDE], "up ?"),)  # the third row holds two images
    batch = inputs(*rows)
    with vlprune.pruned(qwen, method, **budget(method, qwen, ratio=0.5)) as h:
        singles = [gen(qwen, inputs(row)) for row in rows]
        both = gen(qwen, batch)
        assert [(r.row, r.before) for r in h.last] == [(0, 16), (1, 15), (2, 16), (2, 15)]
    for i, single in enumerate(singles):
        assert torch.equal(both[i, -4:], single[0, -4:]), i
        assert torch.equal(both[i, : batch["input_ids"].shape[1]], batch["input_ids"][i])


@pytest.mark.parametrize("method", SUPPORTED)
def test_lm_receives_the_selected_merged_tokens(qwen, method):
    """Image positions carry merged tokens [kept] (merges: sources @ merged tokens); text is untouched."""
    batch = inputs(*TWO_SIZES)
    stage = get_method(method).stage
    merged = image_embeds(qwen, batch)
    rec = LMInputs(qwen)
    try:
        run(qwen, batch)
        with vlprune.pruned(qwen, method, **budget(method, qwen, ratio=0.75)) as h:
            run(qwen, batch)
    finally:
        rec.close()
    full, short = rec.calls[0]["embeds"], rec.calls[1]["embeds"]
    if stage == "llm":  # the LM input is untouched; image tokens leave at decoder layer K
        assert torch.equal(full, short)
        return
    ids = batch["input_ids"]
    for i, r in enumerate(h.last):
        real_full = full[i][batch["attention_mask"][i].bool()]
        row_ids = ids[i][batch["attention_mask"][i].bool()]
        real_short = short[i][rec.calls[1]["mask"][i].bool()]
        image = (row_ids == IMG).nonzero().flatten()
        start, k = int(image[0]), r.after
        assert torch.equal(real_short[:start], real_full[:start])
        assert torch.equal(real_short[start + k:], real_full[start + r.before:])
        got = real_short[start : start + k]
        if stage == "in_encoder":  # later blocks ran on fewer tokens: features differ by design
            assert got.shape == (k, full.shape[-1]) and not torch.equal(got, merged[i][r.kept])
            continue
        want = merged[i][r.kept] if r.sources is None else (r.sources @ merged[i].float()).to(merged[i].dtype)
        if r.sources is not None and hasattr(h.method, "refine"):  # a learned merge (tokenflex) weighs the averages
            want = h.method.refine(want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", SUPPORTED)
def test_labels_are_shortened_with_the_sequence(qwen, method):
    batch = inputs(TWO_SIZES[0])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMG, -100)
    with vlprune.pruned(qwen, method, **budget(method, qwen, ratio=0.75)) as h:
        out = run(qwen, batch, labels=labels)
    short = labels[_kept_columns(batch, h.last)].view(1, -1)  # also for "llm": the positions the head sees
    assert out.logits.shape[1] == short.shape[1]
    want = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), short[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


# -- M-RoPE positions -------------------------------------------------------------------------------
def _kept_columns(batch, records):
    """(B, L) keep mask over the caller's sequence: text and the kept image placeholders."""
    ids = batch["input_ids"]
    keep = ids != IMG
    blocks = (ids == IMG).nonzero().split([r.before for r in records])
    for blk, r in zip(blocks, records):
        chosen = blk[r.kept]
        keep[chosen[:, 0], chosen[:, 1]] = True
    return keep


@pytest.mark.parametrize("method", [m for m in SUPPORTED if get_method(m).stage != "llm"])
def test_survivors_keep_their_original_mrope_positions(qwen, method):
    batch = inputs(*TWO_SIZES)
    rec = LMInputs(qwen)
    try:
        run(qwen, batch)
        gen(qwen, batch, max_new_tokens=2)
        with vlprune.pruned(qwen, method, **budget(method, qwen, keep=5)) as h:
            run(qwen, batch)
            gen(qwen, batch, max_new_tokens=2)
    finally:
        rec.close()
    full_fwd, full_prefill, full_step, fwd, prefill, step = (c["position_ids"] for c in rec.calls)
    keep = _kept_columns(batch, h.last)
    real = batch["attention_mask"].bool()
    for i in range(keep.shape[0]):
        want = full_fwd[:, i][:, keep[i] & real[i]]  # (3, kept) the unpruned sequence's ids at the survivors
        assert torch.equal(fwd[:, i][:, rec.calls[3]["mask"][i].bool()], want)
        assert torch.equal(prefill[1:, i][:, rec.calls[4]["mask"][i].bool()], want)
        assert torch.equal(full_prefill[1:, i][:, real[i]], full_fwd[:, i][:, real[i]])  # control
    # the image really keeps 3-D positions: rows t/h/w differ inside it
    assert not torch.equal(fwd[1], fwd[2])
    # decoding continues after the original maximum, exactly where the unpruned model continues
    assert torch.equal(step[1:], full_step[1:])
    top = full_fwd.masked_fill(~real[None], -1).amax(dim=(0, 2))
    assert step[1:, :, 0].tolist() == [(top + 1).tolist()] * 3


def test_rope_deltas_let_a_manual_decode_step_continue(qwen):
    batch = inputs(TWO_SIZES[0])
    with torch.inference_mode():
        full = qwen(**batch, use_cache=True)
        nxt = full.logits[:, -1:].argmax(-1)
        want = qwen(input_ids=nxt, cache=full.cache, use_cache=True).logits
    with vlprune.pruned(qwen, "fastervlm", keep=4), torch.inference_mode():
        pruned = qwen(**batch, use_cache=True)
        delta = qwen.model.rope_deltas
        rec = LMInputs(qwen)
        try:
            qwen(input_ids=nxt, cache=pruned.cache, use_cache=True)
        finally:
            rec.close()
    top = int(get_rope_max(qwen, batch))
    assert int(delta) == top + 1 - (batch["input_ids"].shape[1] - 12)
    assert rec.calls[0]["position_ids"][:, 0, 0].tolist() == [top + 1] * 3
    assert want.shape == (1, 1, VOCAB)


def get_rope_max(model, batch):
    pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"])
    return pos.max()


def test_llm_stage_layers_see_original_positions(qwen):
    """fastv: layer K's rotary tables are the unpruned ones at the surviving columns (3-D mixed)."""
    batch = inputs(TWO_SIZES[0])
    seen = []

    def grab(_m, _a, kw):
        seen.append(kw["position_embeddings"][0])

    layer = qwen.model.language_model.layers[2]
    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(qwen, batch)
    finally:
        hook.remove()
    with vlprune.pruned(qwen, "fastv", keep=4) as h:  # registered after vlprune's: sees what layer K gets
        hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            run(qwen, batch)
        finally:
            hook.remove()
    keep = _kept_columns(batch, h.last)
    assert torch.equal(seen[1][0], seen[0][0][keep[0]])


# -- window order -> raster order -------------------------------------------------------------------
def _plant(model, d_model):
    """Block 0 attends (and the global token points) at the patches whose hidden state is all ones.

    Rotary off (inv_freq 0), q = 1 everywhere, k = a * x (0 for every patch but the planted unit), v constant:
    in every segment that holds the planted unit, its 4 patches take almost all attention."""
    vis = model.model.visual
    with torch.no_grad():
        vis.rotary_pos_emb.inv_freq.zero_()
        vis.patch_embed.proj.weight.fill_(1.0 / vis.patch_embed.proj.weight[0].numel())
        attn = vis.blocks[0].attn
        hd = attn.head_dim
        w, b = attn.qkv.weight, attn.qkv.bias
        w.zero_()
        b.zero_()
        b[:d_model] = 1.0  # q
        w[d_model : 2 * d_model] = 20.0 / hd**0.5 / d_model  # k = (20 / sqrt(hd)) * mean(x) per dim
        b[2 * d_model :] = 0.5  # v constant: FlowCut's semantic and density terms are flat


@pytest.mark.parametrize("target", [(0, 0), (0, 13), (1, 4), (1, 12), (1, 14)])
def test_planted_score_comes_back_at_its_raster_position(target):
    """A merged token made to dominate block 0 (windowed) is kept, at its raster index, whatever window it
    sits in; checked for the [CLS] substitutes (mean attention received, global token) and in-encoder FlowCut.
    Unit 14 of the 3 x 5 grid is alone in its window: no query can favour it inside that window, so only
    the global token (which sees the whole image) finds it there."""
    model = build_qwen(depth=2, fullatt=(1,))  # block 0 windowed; FlowCut prunes after block 0
    _plant(model, model.config.vision_config.hidden_size)
    batch = inputs(*TWO_SIZES)
    image, unit = target
    pv = torch.zeros_like(batch["pixel_values"])
    offset = 0 if image == 0 else 64  # image 0 has 8 x 8 patches; rows come 2x2 unit by unit, raster order
    pv[offset + 4 * unit : offset + 4 * unit + 4] = 1.0
    batch["pixel_values"] = pv
    methods = [("prumerge_plus", {"layer": 0}), ("flowcut", {})]
    if target != (1, 14):
        methods += [("fastervlm", {"layer": 0}), ("hiprune", {"object_layer": 0, "deep_layer": 0})]
    for method, kw in methods:
        with vlprune.pruned(model, method, keep=1, **kw) as h:
            run(model, batch)
        assert h.last[image].kept.tolist() == [unit], method
        if h.last[image].scores is not None:
            assert int(h.last[image].scores.argmax()) == unit, method


def test_windowed_layout_matches_a_first_principles_permutation(qwen):
    """window_layout's permutation, rebuilt by hand: windows of 2x2 units in raster order, units raster inside."""
    grid = torch.tensor([[1, 6, 10]])
    layout = window_layout(grid, qwen.config.vision_config)
    rows, cols, win = 3, 5, 2
    want = [r * cols + c for wr in range(0, rows, win) for wc in range(0, cols, win)
            for r in range(wr, min(wr + win, rows)) for c in range(wc, min(wc + win, cols))]
    assert layout["window_index"].tolist() == want
    assert layout["cu_windows"].tolist() == [0, 4, 8, 10, 12, 14, 15]


def test_attention_received_is_the_attention_the_blocks_compute(qwen_path):
    """Taps vs the eager attention probabilities the model itself computes, segment by segment (windows in
    windowed blocks, the image in full ones): column sums / image patches, 2x2 unit mean, raster order."""
    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    model = load(qwen_path)
    captured = []

    def capture(module, q, k, v, attention_mask, **kw):
        out, weights = mq.eager_attention_forward(module, q, k, v, attention_mask, **kw)
        captured.append(weights)
        return out, weights

    AttentionInterface.register("vlprune_test_capture", capture)
    batch = inputs(*TWO_SIZES)
    vis = model.model.visual
    layout = window_layout(batch["image_grid_thw"], vis.config)
    patches = layout["patches"]
    for block in (2, 3):  # windowed, full
        captured.clear()
        calls = []
        attn = vis.blocks[block].attn
        hooks = [attn.register_forward_pre_hook(lambda *_: calls.append(len(captured))),
                 attn.register_forward_hook(lambda *_: calls.append(len(captured)))]
        vis.set_attn_implementation("vlprune_test_capture")
        try:
            with torch.inference_mode():
                model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        finally:
            vis.set_attn_implementation("sdpa")
            for hk in hooks:
                hk.remove()
        segs = captured[calls[0] : calls[1]]  # this block's segments, in order
        received = torch.cat([w[0].sum(-2) for w in segs], dim=-1)  # (H, S) in window order
        bounds = np.cumsum([0] + patches)
        for a, b in zip(bounds[:-1], bounds[1:]):
            received[:, a:b] /= b - a
        units = received.view(received.shape[0], -1, 4).mean(-1)[:, layout["reverse"]]
        want = units.mean(0)
        with vlprune.pruned(model, "fastervlm", keep=3, layer=block) as h:
            run(model, batch)
        got = torch.cat([r.scores for r in h.last])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        if block == 2:  # windows: no key receives from another window, each image's units still average 1/N
            assert len(segs) > 2
        for r, n in zip(h.last, patches):
            torch.testing.assert_close(r.scores.mean(), torch.tensor(1.0 / n, device=r.scores.device), rtol=1e-4, atol=0)


def test_keys_and_global_token_are_unit_and_image_means(qwen):
    """prumerge_plus's score rebuilt from block -1's own q/k: keys = mean of each unit's 4 patch keys (after
    rotary) in raster order, [CLS] query/key = the image's mean patch query/key."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    from vlprune.builtin_methods.prumerge_plus import full_width_cls_attention

    batch = inputs(*TWO_SIZES)
    vis = qwen.model.visual
    attn = vis.blocks[-1].attn
    grabbed = {}

    def grab(_m, args, kwargs):
        grabbed["x"], grabbed["rope"] = args[0], kwargs["position_embeddings"]

    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vlprune.pruned(qwen, "prumerge_plus", keep=4) as h:
            run(qwen, batch)
    finally:
        hook.remove()
    with torch.inference_mode():
        q, k, _ = attn.qkv(grabbed["x"]).reshape(-1, 3, attn.num_heads, attn.head_dim).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *grabbed["rope"])
    layout = window_layout(batch["image_grid_thw"], vis.config)
    units = k.view(-1, 4, attn.num_heads, attn.head_dim).mean(1)[layout["reverse"]]  # (U, H, d) raster
    start, ustart = 0, 0
    for rec, n in zip(h.last, layout["patches"]):
        keys = units[ustart : ustart + n // 4].transpose(0, 1)[None]
        want = full_width_cls_attention(q[start : start + n].mean(0)[None], keys, k[start : start + n].mean(0)[None])
        torch.testing.assert_close(rec.scores, want[0], rtol=1e-4, atol=1e-7)
        start, ustart = start + n, ustart + n // 4


def test_right_padded_forward_matches_single_rows(qwen):
    rows = TWO_SIZES
    batch = inputs(*rows, padding_side="right")
    with vlprune.pruned(qwen, "fastervlm", keep=5):
        both = run(qwen, batch).logits
        singles = [run(qwen, inputs(row)).logits[0] for row in rows]
    for i, single in enumerate(singles):  # rows are re-padded on the right after pruning
        torch.testing.assert_close(both[i, : single.shape[0]], single, rtol=1e-4, atol=1e-5)


def test_rows_without_a_mask_that_keep_different_counts_get_one(qwen):
    """Equal-length prompts, no attention_mask: keep=16 keeps all of the 16-token image and 16 of 35, so the
    rows are re-padded (left) and a mask is made for them; each row still equals its single run."""
    rows = (" ".join(WORDS), [SQUARE], "a cat"), ("", [BIG], "a")  # 18 words: both rows 39 tokens
    batch = {k: v for k, v in inputs(*rows).items() if k != "attention_mask"}
    assert batch["input_ids"].shape[1] == 39 and (batch["input_ids"] != PAD).all()
    seen = []
    hook = qwen.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    try:
        with vlprune.pruned(qwen, "fastervlm", keep=16):
            both = run(qwen, batch).logits
            singles = [run(qwen, {k: v for k, v in inputs(row).items() if k != "attention_mask"}).logits[0]
                       for row in rows]
    finally:
        hook.remove()
    assert seen[0].sum(1).tolist() == [39, 20]
    torch.testing.assert_close(both[0], singles[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1, -20:], singles[1], rtol=1e-4, atol=1e-5)


# -- in-encoder pruning -----------------------------------------------------------------------------
def test_flowcut_later_blocks_run_on_fewer_units_in_shrunken_windows(qwen):
    batch = inputs(TWO_SIZES[1])  # 6 x 10 patches: 15 units in 6 windows
    seen = []

    def grab(idx, _m, args, kwargs):
        seen.append((idx, args[0].shape[0], kwargs["cu_seqlens"].tolist()))

    vis = qwen.model.visual
    with vlprune.pruned(qwen, "flowcut", keep=3) as h:
        hooks = [blk.register_forward_pre_hook(functools.partial(grab, i), with_kwargs=True)
                 for i, blk in enumerate(vis.blocks)]
        try:
            run(qwen, batch)
        finally:
            for hk in hooks:
                hk.remove()
    lengths = [n for _i, n, _cu in seen]
    assert lengths[0] == 60 and lengths[-1] == 12 and lengths == sorted(lengths, reverse=True)
    full = set(qwen.config.vision_config.fullatt_block_indexes)
    for idx, n, cu in seen:
        assert cu[0] == 0 and cu[-1] == n and all(b > a for a, b in zip(cu, cu[1:]))
        assert (len(cu) == 2) == (idx in full)
        assert all((b - a) % 4 == 0 and b - a <= 16 for a, b in zip(cu, cu[1:])) or idx in full
    assert h.last[0].after == 3


def test_flowcut_encodes_a_batch_of_different_sizes_in_one_pass(qwen):
    """Images of different sizes (16 and 15 units) go through the tower together, each cut to its own count:
    the last block's full-attention segments are the images' kept units."""
    batch = inputs(*TWO_SIZES)
    seen = []
    last = qwen.model.visual.blocks[-1]
    with vlprune.pruned(qwen, "flowcut", keep=3) as h:  # the hook after vlprune's: it sees the shortened call
        hook = last.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw["cu_seqlens"].tolist()), with_kwargs=True)
        try:
            run(qwen, batch)
        finally:
            hook.remove()
    assert seen == [[0, 12, 24]]  # one pass; two images of 3 units (12 patches) each
    assert [(r.before, r.after) for r in h.last] == [(16, 3), (15, 3)]


# -- errors and pass-through ------------------------------------------------------------------------
def test_errors_are_clear(qwen):
    batch = inputs(TWO_SIZES[0])
    with vlprune.pruned(qwen, "fastervlm", ratio=0.5):
        with pytest.raises(vlprune.VlpruneError, match="needs input_ids"):
            embeds = qwen.model.get_input_embeddings()(batch["input_ids"])
            run(qwen, {**{k: v for k, v in batch.items() if k != "input_ids"}, "inputs_embeds": embeds})
        with pytest.raises(vlprune.VlpruneError, match="image_grid_thw"):
            run(qwen, {k: v for k, v in batch.items() if k != "image_grid_thw"})
        with pytest.raises(vlprune.VlpruneError, match="image features and placeholders do not match"):
            run(qwen, {**batch, "pixel_values": batch["pixel_values"][:-4]})
        with pytest.raises(vlprune.VlpruneError, match="videos are not pruned"):
            run(qwen, {**batch, "pixel_values_videos": batch["pixel_values"]})
        with pytest.raises(vlprune.VlpruneError, match="out of range for a 4-layer"):
            vlprune.patch(qwen, "fastervlm", ratio=0.5, layer=4)
    with pytest.raises(vlprune.VlpruneError, match="keeps no token"):
        with vlprune.pruned(qwen, "fastervlm", ratio=0.99):
            run(qwen, batch)


def test_text_only_and_disabled_calls_pass_through(qwen):
    ids = torch.tensor([[BOS, 7, 8, 9]], device=DEVICE)
    batch = inputs(TWO_SIZES[0])
    ref_text, ref = run(qwen, {"input_ids": ids}).logits, run(qwen, batch).logits
    with vlprune.pruned(qwen, "fastervlm", ratio=0.75) as h:
        assert torch.equal(run(qwen, {"input_ids": ids}).logits, ref_text)
        with h.disabled():
            assert torch.equal(run(qwen, batch).logits, ref)
        assert run(qwen, batch).logits.shape[1] == batch["input_ids"].shape[1] - 12


def test_one_image_under_budget_stays_whole_in_a_pruned_batch(qwen):
    batch = inputs(("what is", [SQUARE], "a"), ("how many", [BIG], "?"))
    merged = image_embeds(qwen, batch)
    rec = LMInputs(qwen)
    try:
        with vlprune.pruned(qwen, "fastervlm", keep=16) as h:
            run(qwen, batch)
    finally:
        rec.close()
    assert [(r.before, r.after) for r in h.last] == [(16, 16), (35, 16)]
    embeds = rec.calls[0]["embeds"][0][rec.calls[0]["mask"][0].bool()]
    start = int((batch["input_ids"][0][batch["attention_mask"][0].bool()] == IMG).nonzero()[0])
    assert torch.equal(embeds[start : start + 16], merged[0])


def test_bf16_runs_each_kind_of_method(qwen_path):
    model = load(qwen_path, dtype=torch.bfloat16)
    batch = inputs(*TWO_SIZES)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    ref = run(model, batch).logits
    with vlprune.pruned(model, "fastervlm", ratio=0.0):
        assert torch.equal(run(model, batch).logits, ref)
    for method in ("hiprune", "prumerge_plus", "flowcut", "fastv"):  # received, global token/keys, in-encoder, LM
        with vlprune.pruned(model, method, **budget(method, model, ratio=0.75)):
            out = gen(model, batch, max_new_tokens=3)
            n = batch["input_ids"].shape[1]
            assert out.shape == (2, n + 3) and torch.equal(out[:, :n], batch["input_ids"])


# -- Qwen2.5-VL-7B vision geometry ------------------------------------------------------------------
def test_real_7b_vision_geometry():
    """Qwen2.5-VL-7B's vision tower (32 blocks, 1280 wide, 112 px windows, full attention in blocks 7/15/23/31),
    random weights, a 1-layer LM: a 308 x 476 px image (22 x 34 patches, 11 x 17 merged tokens, 15 windows of
    up to 4 x 4 units with ragged edges). Counts, scores in raster order against a dense reference of the last
    (full-attention) block, and the survivors' 3-D positions. About 30 s of CPU."""
    model = build_qwen(depth=32, fullatt=(7, 15, 23, 31), window=112, vision_hidden=1280, heads=16,
                       vision_intermediate=3420, out_hidden=3584, lm_layers=1, lm_heads=28, lm_kv_heads=4,
                       mrope=(16, 24, 24), lm_intermediate=256)
    batch = inputs(("what is", [(308, 476)], "a cat"), max_pixels=12845056)  # Qwen2.5-VL's default maximum
    assert batch["image_grid_thw"].tolist() == [[1, 22, 34]]
    n = 11 * 17
    vis = model.model.visual
    grabbed = {}

    def grab(_m, args, kwargs):
        grabbed["x"], grabbed["rope"] = args[0], kwargs["position_embeddings"]

    hook = vis.blocks[31].attn.register_forward_pre_hook(grab, with_kwargs=True)
    rec = LMInputs(model)
    try:  # one pruned forward; the references are rebuilt from what block 31 received
        with vlprune.pruned(model, "fastervlm", keep=64, layer=-1) as h:
            run(model, batch)
    finally:
        hook.remove()
        rec.close()
    attn = vis.blocks[31].attn
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    with torch.inference_mode():
        q, k, _ = attn.qkv(grabbed["x"]).reshape(-1, 3, attn.num_heads, attn.head_dim).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *grabbed["rope"])
        probs = torch.softmax(q.transpose(0, 1) @ k.transpose(0, 1).transpose(-1, -2) * attn.scaling, dim=-1)
    layout = window_layout(batch["image_grid_thw"], vis.config)
    assert len(layout["cu_windows"]) - 1 == 3 * 5
    want = probs.mean(1).view(attn.num_heads, -1, 4).mean(-1)[:, layout["reverse"]].mean(0)
    rec_ = h.last[0]
    assert (rec_.before, rec_.after) == (n, 64)
    torch.testing.assert_close(rec_.scores, want, rtol=1e-3, atol=1e-7)
    assert rec_.kept.tolist() == want.topk(64).indices.sort().values.tolist()
    full_pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"])
    keep = _kept_columns(batch, h.last)
    assert torch.equal(rec.calls[0]["position_ids"][:, 0], full_pos[:, 0][:, keep[0]])
    assert rec.calls[0]["embeds"].shape[1] == batch["input_ids"].shape[1] - (n - 64)
