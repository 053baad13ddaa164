"""HF LLaVA-NeXT (AnyRes) patcher: layout, per-image budget, newlines, and the contract for every method.

A tiny random LlavaNext (CLIP 12 layers, 56 px views = 4 x 4 patches, pinpoints up to 112 px, 4-layer
Llama) saved and loaded back, fed by a real LlavaNextProcessor; images of several aspect ratios give
different crop grids and unpadding.
"""
import pytest
import torch
from PIL import Image

import vlprune
from test_contract import LMInputs, adaptive, budget
from tiny import DEVICE, IMAGE_TOKEN, PAD, VOCAB, fail_if_left_patched, sharpen, tiny_clip, tiny_text
from vlprune.eval import configs
from vlprune.patches.llava_next_hf import LlavaNextHF, anyres_layout, split_budget
from vlprune.registry import get_method

METHODS = sorted(m for m in vlprune.methods() if LlavaNextHF.support(get_method(m)) == "yes")  # damro: test_method_damro_families.py
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
SIDE = 4  # 56 px views, 14 px patches
# (height, width) -> unpadded high-res grid (H, W): one crop; 1 x 2 crops, rows cut; 2 x 1, columns cut; 2 x 2
SIZES = {"square": (56, 56), "wide": (30, 100), "tall": (100, 30), "big": (90, 110)}
HIGH = {"square": (4, 4), "wide": (2, 8), "tall": (8, 2), "big": (6, 8)}


# -- the tiny model and its processor ---------------------------------------------------------------
def next_config(vision_layers=12, lm_layers=4):
    return configs.llava_next_config(tiny_clip(vision_layers), tiny_text(lm_layers), PINPOINTS, IMAGE_TOKEN)


def load(path, **kwargs):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(path, **kwargs).eval().to(DEVICE)


@pytest.fixture(scope="module")
def next_path(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-llava-next"))


def build(path):
    """Save the tiny random LlavaNext under ``path`` (also the contract suite's NeXT family)."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(next_config(), attn_implementation="sdpa")
    sharpen(model)
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def _shared(next_path):
    return load(next_path)


@pytest.fixture
def nxt(_shared):
    yield _shared
    fail_if_left_patched(_shared)


def make_processor(size=56, pinpoints=PINPOINTS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "x", "<image>"] + [f"w{i}" for i in range(VOCAB - 6)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left")
    images = LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


PROCESSOR = None


def inputs(names, texts=None, seed=0):
    """Processor output for one image per prompt (``names`` of SIZES; a tuple = several images in one prompt)."""
    global PROCESSOR
    PROCESSOR = PROCESSOR or make_processor()
    groups = [n if isinstance(n, tuple) else (n,) for n in names]
    texts = texts or [f"w1 w{2 + i} " + " w9 ".join("<image>" for _ in g) + " w3 w4" for i, g in enumerate(groups)]
    gen = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(*SIZES[n], 3, generator=gen) * 255).to(torch.uint8).numpy())
              for g in groups for n in g]
    return PROCESSOR(images=images, text=texts, return_tensors="pt", padding=True).to(DEVICE)


def run(model, inp, **kw):
    with torch.inference_mode():
        return model(**inp, **kw)


def gen(model, inp, **kw):
    kw.setdefault("max_new_tokens", 6)
    with torch.inference_mode():
        return model.generate(**inp, do_sample=False, **kw)


def expected_keep(inp, records):
    """Independently of the patcher: the positions of the unpruned sequence the LM should receive - text,
    kept visual tokens, and the newline of every high-res row that keeps a token."""
    ids = inp["input_ids"]
    keep = ids != IMAGE_TOKEN
    image = (ids == IMAGE_TOKEN).nonzero()
    start = 0
    for rec in records:
        (s, _), (h, w) = rec.grids
        n = s * s + h * (w + 1)  # base, then H rows of W tokens + a newline
        block = image[start : start + n]
        start += n
        assert bool((block[:, 0] == rec.row).all())
        kept = rec.kept.cpu()
        high = kept[kept >= s * s] - s * s
        offsets = torch.cat([kept[kept < s * s], s * s + high // w * (w + 1) + high % w,
                             s * s + (high // w).unique() * (w + 1) + w])
        keep[block[offsets, 0], block[offsets, 1]] = True
    assert start == len(image)
    return keep


# -- geometry ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pinpoints,size", [(PINPOINTS, s) for s in [*SIZES.values(), (47, 53), (60, 200), (200, 61),
                                                                      (111, 57), (30, 31)]]
                         + [([[112, 112]], (20, 110)), ([[112, 112]], (5, 200)), ([[112, 112]], (200, 7))])
def test_layout_matches_the_models_packing(nxt, pinpoints, size):
    """Each (view, patch) lands where pack_image_features puts it; newlines close every high-res row."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    layout = anyres_layout(size, tuple(map(tuple, pinpoints)), 56, SIDE)
    views = image_size_to_num_patches(list(size), pinpoints, 56)
    assert layout.n_views == views
    code = (torch.arange(views)[:, None] * 100 + torch.arange(16) + 1).float()[..., None]  # (views, 16, 1)
    old, nxt.config.image_grid_pinpoints = nxt.config.image_grid_pinpoints, pinpoints
    try:
        packed, _ = nxt.model.pack_image_features([code], torch.tensor([size]), "default", image_newline=torch.zeros(1))
    finally:
        nxt.config.image_grid_pinpoints = old
    packed = packed[0][:, 0]
    want = torch.zeros(layout.placeholders)
    for view in layout.views:
        want[layout.offsets(view.visual)] = (view.index * 100 + view.local + 1).float()
        assert len(view.local) == view.grid[0] * view.grid[1]
    assert torch.equal(packed, want)
    assert sum(len(v.local) for v in layout.views) == layout.visual


def test_layout_of_a_wide_image_by_hand():
    layout = anyres_layout((30, 100), tuple(map(tuple, PINPOINTS)), 56, SIDE)
    assert layout.high == (2, 8) and layout.visual == 32 and layout.placeholders == 34 and layout.n_views == 3
    base, left, right = layout.views
    assert left.local.tolist() == right.local.tolist() == list(range(4, 12))  # rows 1-2 of each 4 x 4 crop
    assert left.grid == right.grid == (2, 4)
    assert left.visual.tolist() == [16, 17, 18, 19, 24, 25, 26, 27]  # left half of the 2 x 8 grid
    assert right.visual.tolist() == [20, 21, 22, 23, 28, 29, 30, 31]
    tokens, newlines = layout.kept_offsets(torch.tensor([3, 20, 31]))  # base 3; (row 0, col 4); (row 1, col 7)
    assert tokens.tolist() == [3, 20, 32] and newlines.tolist() == [24, 33]  # rows are 8 tokens + a newline


@pytest.mark.parametrize("k,sizes,want", [(8, [16, 16], [4, 4]), (7, [16, 16], [4, 3]), (8, [16, 8, 8], [4, 2, 2]),
                                          (5, [16, 8, 8], [3, 1, 1]), (3, [16, 16, 16, 16, 16], [1, 1, 1, 0, 0]),
                                          (145, [576] * 5, [29] * 5), (320, [576, 480, 480], [120, 100, 100])])
def test_budget_split_is_proportional_and_exact(k, sizes, want):
    assert split_budget(k, sizes) == want


# -- support table ----------------------------------------------------------------------------------
def test_every_pruning_method_is_served_and_damro_with_the_anyres_substitute():
    verdicts = {m: LlavaNextHF.support(get_method(m)) for m in vlprune.methods()}
    assert {m for m, v in verdicts.items() if v != "yes"} == {"damro"}
    assert verdicts["damro"].startswith("substitute: AnyRes has one [CLS] per view")


# -- the contract, every method ---------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_lm_receives_the_budgeted_sequence_with_row_newlines(nxt, method):
    """Two prompts: one with a wide and a tall image, one with a 2 x 2-crop image. Per image k of its N
    visual tokens; the LM gets exactly text + kept tokens + one newline per non-empty row."""
    inp = inputs([("wide", "tall"), "big"])
    rec_full = LMInputs(nxt)
    try:
        run(nxt, inp)
    finally:
        rec_full.close()
    with vlprune.pruned(nxt, method, **budget(method, nxt, ratio=0.75)) as h:
        plan = h._patcher.llm.plan if h.method.stage == "llm" else None  # several drops: after the last
        rec = LMInputs(nxt, (plan[-1] if plan else h._patcher.llm.k_layer) if h.method.stage == "llm" else None)
        try:
            run(nxt, inp)
        finally:
            rec.close()
        records = h.last
    budgeted = get_method(method).budgeted
    counts = [r.counts[plan[-1]] for r in records] if adaptive(method) else [8 * budgeted, 8 * budgeted, 16 * budgeted]
    assert [(r.row, r.before, r.after, r.grids[1]) for r in records] == [
        (0, 32, counts[0], HIGH["wide"]), (0, 32, counts[1], HIGH["tall"]), (1, 64, counts[2], HIGH["big"])]
    for r in records:
        kept = r.kept.tolist()
        assert kept == sorted(set(kept)) and all(0 <= i < r.before for i in kept)
        assert r.newlines == len({(i - 16) // r.grids[1][1] for i in kept if i >= 16})
        assert torch.equal(torch.cat([r.kept_base, 16 + r.kept_high]), r.kept)
    keep = expected_keep(inp, records)
    got = rec.calls[0]["embeds"]
    if h.method.stage == "llm":  # the LM input is whole; layer K gets one row per prompt, evened out by fillers
        assert got.shape[1] == int(keep.sum(1).max())
        return
    full = rec_full.calls[0]["embeds"]
    assert got.shape[1] == int(keep.sum(1).max())
    image = inp["input_ids"] == IMAGE_TOKEN
    newline = nxt.model.image_newline
    for b in range(2):
        short = got[b, got.shape[1] - int(keep[b].sum()):]  # left padded
        want = full[b][keep[b]]
        kept_image = image[b][keep[b]]
        assert torch.equal(short[~kept_image], want[~kept_image])  # text untouched
        is_newline = (want == newline).all(-1) & kept_image
        assert torch.equal(short[is_newline], want[is_newline])  # newlines exactly where expected
        assert int(is_newline.sum()) == sum(r.newlines for r in records if r.row == b)
        if h.method.stage in ("encoder", "projector") and all(r.sources is None for r in records):
            torch.testing.assert_close(short, want, rtol=1e-5, atol=1e-5)  # projector(selected features)


@pytest.mark.parametrize("method", METHODS)
def test_generate_keeps_the_prompt_ids_contract(nxt, method):
    inp = inputs(["tall", "square"])
    ids = inp["input_ids"]
    with vlprune.pruned(nxt, method, **budget(method, nxt, ratio=0.75)):
        out = gen(nxt, inp, max_new_tokens=4)
        assert out.shape == (2, ids.shape[1] + 4) and torch.equal(out[:, : ids.shape[1]], ids)
        assert torch.equal(gen(nxt, inp, max_new_tokens=4, return_dict_in_generate=True).sequences, out)
        assert gen(nxt, inp, max_new_tokens=None, max_length=ids.shape[1] + 3).shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pair", [(("square", "wide"), "tall")])  # ("wide", "big"): test_contract.py
def test_batch_of_different_aspect_ratios_equals_single_runs(nxt, method, pair):
    texts = ["w1 w7 w8 w9 " + " w5 ".join("<image>" for _ in (p if isinstance(p, tuple) else (p,))) + " w3"
             for p in pair]
    texts[1] = "w1 " + texts[1].split(" ", 4)[-1]  # a shorter prompt: left padding
    parts = [inputs([p], [t], seed=i) for i, (p, t) in enumerate(zip(pair, texts))]
    with vlprune.pruned(nxt, method, **budget(method, nxt, ratio=0.5)) as h:
        singles, counts = [], []
        for part in parts:
            singles.append(gen(nxt, part))
            counts += [(r.before, r.after, r.newlines) for r in h.last]
        both = gen(nxt, _concat(parts))
        assert [(r.before, r.after, r.newlines) for r in h.last] == counts
    for i, single in enumerate(singles):
        assert torch.equal(both[i, -6:], single[0, -6:])


def _concat(parts):
    """Two single-prompt processor outputs as one left-padded batch (same images, same pixels)."""
    width = max(p["input_ids"].shape[1] for p in parts)
    views = max(p["pixel_values"].shape[1] for p in parts)
    out = {}
    for p in parts:
        pad = width - p["input_ids"].shape[1]
        pv = p["pixel_values"]
        pv = torch.cat([pv, pv.new_zeros(pv.shape[0], views - pv.shape[1], *pv.shape[2:])], 1)
        row = {"input_ids": torch.nn.functional.pad(p["input_ids"], (pad, 0), value=PAD),
               "attention_mask": torch.nn.functional.pad(p["attention_mask"], (pad, 0), value=0),
               "pixel_values": pv, "image_sizes": p["image_sizes"]}
        for key, value in row.items():
            out[key] = value if key not in out else torch.cat([out[key], value])
    return out


# -- options, inputs, signals -----------------------------------------------------------------------
def test_positions_original_keeps_the_unpruned_positions(nxt):
    inp = inputs(["wide"])
    rec = LMInputs(nxt)
    try:
        with vlprune.pruned(nxt, "fastervlm", keep=6, positions="original") as h:
            run(nxt, inp)
    finally:
        rec.close()
    keep = expected_keep(inp, h.last)[0]
    assert rec.calls[0]["position_ids"][0].tolist() == keep.nonzero().flatten().tolist()


def test_scores_are_each_views_own_cls_row_and_quotas_follow_unpadding(next_path):
    """fastervlm on NeXT: per view, top-q of that view's eager [CLS] row (layer -2) over its unpadded patches."""
    model = load(next_path, attn_implementation="eager")
    inp = inputs(["wide"])
    with torch.inference_mode():
        views = inp["pixel_values"][0, :3]
        attn = model.model.vision_tower(views, output_attentions=True).attentions[-2][:, :, 0, 1:].mean(1)
    with vlprune.pruned(model, "fastervlm", keep=8) as h:
        run(model, inp)
    rec = h.last[0]
    layout = anyres_layout(SIZES["wide"], tuple(map(tuple, PINPOINTS)), 56, SIDE)
    quotas = split_budget(8, [len(v.local) for v in layout.views])
    assert quotas == [4, 2, 2]  # base 16 tokens, each crop 8 after unpadding
    want = []
    for view, q in zip(layout.views, quotas):
        row = attn[view.index, view.local]
        torch.testing.assert_close(rec.scores[view.visual], row, rtol=1e-5, atol=1e-7)
        want += view.visual[row.topk(q).indices.cpu()].tolist()
    assert rec.kept.tolist() == sorted(want)


def test_flowcut_keeps_only_tokens_that_survive_unpadding(nxt):
    inp = inputs(["tall"])  # 2 x 1 crops, columns 1-2 of each crop survive unpadding
    with vlprune.pruned(nxt, "flowcut", keep=10) as h:
        run(nxt, inp)
    rec = h.last[0]
    assert rec.after == 10 and len(rec.kept_base) == 5 and len(rec.kept_high) == 5
    assert bool((rec.kept_high < 16).all())  # index space of the 8 x 2 unpadded grid


def test_flowcut_runs_every_view_in_one_pass_as_each_would_run_alone(next_path, monkeypatch):
    import test_released_flowcut as released_flowcut
    from vlprune.patches._clip import encoder_layers

    nxt = load(next_path)
    with torch.no_grad():  # peaked [CLS] attention: the early cuts drop tokens (a random tower's rarely do)
        for layer in encoder_layers(nxt.model.vision_tower):
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight *= 4

    """Every view of a batch, each with its own quota and unpadded tokens, goes through the tower once (rows
    padded to the largest quota, the padding masked); each row keeps what that view keeps alone."""
    inp = inputs(["tall", "wide", "big"])
    calls = []
    with vlprune.pruned(nxt, "flowcut", keep=10) as h:
        patcher = h._patcher
        tower = patcher._tower
        monkeypatch.setattr(patcher, "_tower", lambda *a: calls.append((a, tower(*a))) or calls[-1][1])
        run(nxt, inp)
        assert len(calls) == 1  # one pass for all views of all images
        (pixels, layer, quotas, visible), (feats, _, orig) = calls[0]
        assert len(set(quotas)) > 1 and any(v is not None for v in visible)  # ragged rows, unpadded views
        for j, (q, local) in enumerate(zip(quotas, visible)):
            with torch.inference_mode():
                alone, _, alone_orig = tower(pixels[j : j + 1], layer, [q], [local])
            assert alone_orig.shape[1] == q and torch.equal(orig[j, :q], alone_orig[0])
            torch.testing.assert_close(feats[j, :q], alone[0], rtol=0, atol=1e-5)
            with torch.no_grad():  # the released code's FlowCut re-derived, scoring only the unpadded tokens
                want, _ = released_flowcut.oracle(nxt.model.vision_tower, pixels[j : j + 1], q,
                                                  visible=local)
            assert orig[j, :q].tolist() == want[0].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # no mask (plain causal) / a float additive mask
def test_llm_stage_rows_of_equal_length_but_different_kept_counts(next_path, attn):
    """No padding, yet the rows keep different newline counts: fillers even them out, decode masks them."""
    nxt = load(next_path, attn_implementation=attn)
    inp = inputs(["big", "big"], texts=["w1 <image> w3", "w1 <image> w4"], seed=3)
    with vlprune.pruned(nxt, "fastv", keep=12) as h:
        both = gen(nxt, inp)
        counts = [r.newlines for r in h.last]
        singles = [gen(nxt, {k: v[i : i + 1] for k, v in inp.items()}) for i in range(2)]
    assert counts[0] != counts[1], "the case needs rows that keep different numbers of newlines"
    for i, single in enumerate(singles):
        assert torch.equal(both[i], single[0])


def test_errors_are_clear(nxt):
    inp = inputs(["wide"])
    with vlprune.pruned(nxt, "fastervlm", ratio=0.5):
        no_sizes = {k: v for k, v in inp.items() if k != "image_sizes"}
        with pytest.raises(vlprune.VlpruneError, match="image_sizes"):
            run(nxt, no_sizes)
        first = int((inp["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])  # one placeholder short
        wrong = dict(inp, **{k: torch.cat([inp[k][:, :first], inp[k][:, first + 1:]], 1)
                             for k in ("input_ids", "attention_mask")})
        with pytest.raises(vlprune.VlpruneError, match="image features and placeholders do not match"):
            run(nxt, wrong)
        with pytest.raises(vlprune.VlpruneError, match="vision_feature_select_strategy"):
            run(nxt, inp, vision_feature_select_strategy="full")
    with vlprune.pruned(nxt, "fastervlm", ratio=0.99):
        with pytest.raises(vlprune.VlpruneError, match="keeps no token"):
            run(nxt, inp)


def test_patched_model_is_isolated(nxt, next_path):
    from transformers import LlavaNextForConditionalGeneration

    other = load(next_path)
    inp = inputs(["big"])
    ref = run(other, inp).logits
    forward = LlavaNextForConditionalGeneration.forward
    with vlprune.pruned(nxt, "hiprune", ratio=0.75):
        assert torch.equal(run(other, inp).logits, ref)
        assert LlavaNextForConditionalGeneration.forward is forward
        assert run(nxt, inp).logits.shape[1] < ref.shape[1]


# -- LLaVA-NeXT-7B's real vision geometry -----------------------------------------------------------
NEXT_7B_PINPOINTS = configs.NEXT_7B_PINPOINTS


def test_real_geometry_counts_quotas_newlines_and_per_view_cls_rows():
    """CLIP ViT-L/14-336 (24 layers, 24 x 24 patches per view) with LLaVA-NeXT-7B's pinpoints, random weights,
    a 1-layer LM. A 320 x 672 image takes 1 x 2 crops; unpadding leaves 22 of the 24 x 48 high-res rows."""
    from transformers import LlavaNextForConditionalGeneration

    cfg = configs.llava_next_config(configs.CLIP_L_336, dict(tiny_text(1), max_position_embeddings=4096),
                                    NEXT_7B_PINPOINTS, IMAGE_TOKEN)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval().to(DEVICE)
    with torch.no_grad():  # sharpen the random attention so no per-view top-q boundary is a near-tie
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    processor = make_processor(336, NEXT_7B_PINPOINTS)
    picture = Image.fromarray((torch.rand(320, 672, 3, generator=torch.Generator().manual_seed(0)) * 255)
                              .to(torch.uint8).numpy())
    inp = processor(images=picture, text="w1 w2 <image> w3", return_tensors="pt").to(DEVICE)
    ids = inp["input_ids"]
    layout = anyres_layout((320, 672), tuple(map(tuple, NEXT_7B_PINPOINTS)), 336, 24)
    assert layout.high == (22, 48) and layout.n_views == 3 == inp["pixel_values"].shape[1]
    assert int((ids == IMAGE_TOKEN).sum()) == layout.placeholders == 576 + 22 * 49
    assert [len(v.local) for v in layout.views] == [576, 528, 528]  # each crop loses its top and bottom row
    quotas = (113, 104, 103)  # 320 in proportion to 576 : 528 : 528, largest remainders first
    assert split_budget(320, [576, 528, 528]) == list(quotas)

    seen, normed = [], []
    attention = model.model.vision_tower.encoder.layers[22].self_attn  # layer -2 of 24
    hooks = [model.model.language_model.register_forward_pre_hook(
                 lambda _m, _a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True),
             model.model.vision_tower.encoder.layers[22].layer_norm1.register_forward_hook(
                 lambda _m, _a, out: normed.append(out))]
    try:
        with vlprune.pruned(model, "fastervlm", keep=320) as h, torch.inference_mode():
            model(**inp)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.inference_mode():  # the [CLS] row of layer 22, written out: softmax(q_cls . K^T * scale), head mean
        q = attention.q_proj(normed[0]).view(3, 577, 16, 64).transpose(1, 2)
        k = attention.k_proj(normed[0]).view(3, 577, 16, 64).transpose(1, 2)
        cls_rows = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attention.scale, -1)[:, :, 0, 1:].mean(1)
    rec = h.last[0]
    assert (rec.before, rec.after, rec.grids) == (1632, 320, ((24, 24), (22, 48)))
    assert (len(rec.kept_base), len(rec.kept_high)) == (113, 207)
    for view, q in zip(layout.views, quotas):
        row = cls_rows[view.index, view.local]
        torch.testing.assert_close(rec.scores[view.visual], row, rtol=1e-4, atol=1e-7)
        chosen = torch.isin(view.visual, rec.kept.cpu())  # this view's survivors: its top q by its own row
        assert int(chosen.sum()) == q
        assert float(row[chosen].min()) >= float(row[~chosen].max()) - 1e-6
    rows = sorted({int(i) // 48 for i in rec.kept_high})
    assert rec.newlines == len(rows)
    lm_input = seen[0][0]
    assert lm_input.shape[0] == ids.shape[1] - layout.placeholders + 320 + len(rows)
    # the image block: 113 base tokens, then each kept row's tokens closed by the newline
    start = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    block = lm_input[start : start + 320 + len(rows)]
    is_newline = (block == model.model.image_newline).all(-1)
    per_row = torch.bincount(rec.kept_high // 48, minlength=22)[rows]
    want_newline = torch.zeros(len(block), dtype=torch.bool)
    want_newline[113 + per_row.cumsum(0).cpu() + torch.arange(len(rows))] = True
    assert torch.equal(is_newline.cpu(), want_newline)
