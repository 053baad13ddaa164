"""The demo's pure parts (eval/demo.py): the kept-patch overlay and its merged regions, the record -> grid
mapping of each model family (on hand-made records and on real records of tiny LLaVA-NeXT and Qwen2.5-VL
models), the answer check against a sample's expected answer, the method descriptions, and the input
checks whose messages the page shows. No embedded model, no server."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlprune
from vlprune.eval import demo
from vlprune.eval.demo import DemoInputError, Panel, keep_mask, llava_box, merge_colour, merge_groups, overlay, panels_for
from vlprune.patcher import ImageRecord
from vlprune.patches.llava_next_hf import NextImageRecord


def flat(value, size=(40, 20)):
    return Image.new("RGB", size, (value, value, value))


def cells(img: Image.Image, grid):
    """Mean brightness of each cell of a one-panel overlay -> (rows, cols) array."""
    a = np.asarray(img, dtype=np.float64)[..., 0]
    rows, cols = grid
    cell = a.shape[0] // rows
    return a[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell).mean(axis=(1, 3))


# -- overlay --------------------------------------------------------------------------------------------
def test_kept_cells_unchanged_dropped_cells_dimmed():
    out = overlay(flat(200, (64, 64)), [Panel((2, 2), (0, 3), (0, 0, 64, 64))], dim=0.25, panel_px=64)
    assert out.size == (64, 64)
    np.testing.assert_allclose(cells(out, (2, 2)), [[200, 50], [50, 200]])


def test_cells_follow_raster_order_on_a_wide_grid():
    # kept index 4 of a 2 x 3 grid is row 1, column 1 (raster order), not row 0, column 4 or row 2, column 0
    out = overlay(flat(100, (30, 20)), [Panel((2, 3), (4,), (0, 0, 30, 20))], dim=0.0, panel_px=30)
    assert out.size == (30, 20)  # one square cell per token: 3 x 2 cells of 10 px
    np.testing.assert_array_equal(cells(out, (2, 3)) > 0, [[False, False, False], [False, True, False]])


def test_box_crops_the_region_the_grid_covers():
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 255  # a white centre square between black sides
    out = overlay(Image.fromarray(img), [Panel((1, 1), (0,), (10, 0, 20, 10))], panel_px=10)
    assert np.asarray(out).min() == 255  # only the centre square was drawn


def test_panels_side_by_side_with_gap():
    out = overlay(flat(90), [Panel((2, 2), (), (0, 0, 40, 20)), Panel((1, 4), (0, 1, 2, 3), (0, 0, 40, 20))],
                  gap=8, panel_px=40, dim=0.5)
    assert out.size == (40 + 8 + 40, 40)
    a = np.asarray(out)[..., 0]
    assert (a[:, :40] == 45).all() and (a[:, 40:48] == 0).all()  # dimmed first panel, black gap
    assert (a[:10, 48:] == 90).all() and (a[10:, 48:] == 0).all()  # the 1 x 4 panel is 10 px high, top-aligned


def test_keep_mask_refuses_indices_off_the_grid():
    with pytest.raises(ValueError, match="out of range for a 2x2 grid"):
        keep_mask((2, 2), [4])
    with pytest.raises(ValueError, match="at least one panel"):
        overlay(flat(1), [])


def test_merged_regions_are_tinted_and_outlined_unlike_single_kept_patches():
    """A 4 x 4 grid: token 15 kept alone; output 0 averages the 2 x 2 block at the top left (0, 1, 4, 5),
    standing at 0. The block's other cells take its colour and a white outline; cell 0 itself and the
    single kept cell keep the image; the rest is dimmed. 16 px cells, outline 1 px."""
    sources = torch.zeros(2, 16)
    sources[0, [0, 1, 4, 5]] = 0.25
    sources[1, 15] = 1.0
    rec = ImageRecord(row=0, before=16, after=2, kept=torch.tensor([0, 15]), sources=sources)
    (p,) = panels_for(rec, (64, 64))
    assert p.kept == (0, 15) and p.merged == ((0, 1, 4, 5),)
    out = np.asarray(overlay(flat(100, (64, 64)), [p], dim=0.5, tint=0.4, panel_px=64)).astype(int)
    centre = lambda i: out[(i // 4) * 16 + 8, (i % 4) * 16 + 8]  # noqa: E731
    tinted = np.round(100 * 0.6 + merge_colour(0) * 0.4)
    for i in (1, 4, 5):
        np.testing.assert_array_equal(centre(i), tinted)
    np.testing.assert_array_equal(centre(0), [100] * 3)  # the token's own patch, as a kept patch
    np.testing.assert_array_equal(centre(15), [100] * 3)  # kept alone: no tint ...
    assert (out[48:64, 48:64] == 100).all()  # ... and no outline
    np.testing.assert_array_equal(centre(2), [50] * 3)  # dropped: dimmed
    assert (out[0, :32] == 255).all() and (out[:32, 0] == 255).all()  # the block's outline, top and left
    assert (out[31, :32] == 255).all() and (out[:32, 31] == 255).all()  # bottom and right
    assert (out[15, 1:31] != 255).any(axis=-1).all()  # no line between cells of one region


def test_a_patch_several_outputs_draw_on_goes_to_the_heaviest():
    """prumerge_plus-style overlapping neighbours: patches 1 and 2 are in both outputs' sources; each goes to
    the output that weighs it more (1 to output 0, 2 to output 1), so the regions do not overlap."""
    sources = torch.tensor([[0.8, 0.15, 0.05, 0.0], [0.0, 0.1, 0.3, 0.6]])
    rec = ImageRecord(row=0, before=4, after=2, kept=torch.tensor([0, 3]), sources=sources)
    assert merge_groups(rec) == [(0, 1), (2, 3)]
    one_hot = ImageRecord(row=0, before=4, after=2, kept=torch.tensor([0, 3]), sources=torch.eye(4)[[0, 3]])
    assert merge_groups(one_hot) == [] and merge_groups(ImageRecord(row=0, before=4, after=2, kept=torch.tensor([0, 3]))) == []


def test_next_record_merged_regions_land_on_their_panel():
    # base view 2 x 2 (0..3), high-res 1 x 4 (4..7): output 0 averages base 0, 1; output 1 averages high-res 5, 6, 7
    sources = torch.zeros(2, 8)
    sources[0, [0, 1]] = 0.5
    sources[1, [5, 6, 7]] = 1 / 3
    rec = NextImageRecord(row=0, before=8, after=2, kept=torch.tensor([0, 6]), sources=sources, grids=((2, 2), (1, 4)))
    base, high = panels_for(rec, (80, 20))
    assert (base.kept, base.merged, high.kept, high.merged) == ((0,), ((0, 1),), (2,), ((1, 2, 3),))


# -- record -> panels -------------------------------------------------------------------------------
class Proc:
    def __init__(self, **flags):
        self.__dict__.update(flags)


@pytest.mark.parametrize("flags, box", [({}, (0, 0, 300, 200)), ({"do_center_crop": True}, (50, 0, 250, 200)),
                                        ({"do_pad": True}, (0, -50, 300, 250))])
def test_llava_box_follows_the_processor(flags, box):
    assert llava_box((300, 200), Proc(**flags)) == box


def test_llava_record_is_a_square_grid():
    rec = ImageRecord(row=0, before=16, after=2, kept=torch.tensor([0, 15]))
    (p,) = panels_for(rec, (300, 200), Proc(do_center_crop=True))
    assert p.grid == (4, 4) and p.kept == (0, 15) and p.box == (50, 0, 250, 200)
    with pytest.raises(ValueError, match="square grid"):
        panels_for(ImageRecord(row=0, before=15, after=1, kept=torch.tensor([0])), (10, 10))


def test_next_record_splits_into_base_view_and_high_res_grid():
    # base view 2 x 2 (indices 0..3), high-res 3 x 4 (indices 4..15): kept 1 and 3 in the base view,
    # 4 + 5 = high-res (row 1, col 1) and 4 + 11 = the last high-res token
    rec = NextImageRecord(row=0, before=16, after=4, kept=torch.tensor([1, 3, 9, 15]), grids=((2, 2), (3, 4)))
    base, high = panels_for(rec, (80, 60))
    assert (base.grid, base.kept, high.grid, high.kept) == ((2, 2), (1, 3), (3, 4), (5, 11))
    assert base.box == high.box == (0, 0, 80, 60)


def test_qwen_record_uses_the_merged_grid():
    rec = ImageRecord(row=0, before=15, after=2, kept=torch.tensor([0, 14]))
    (p,) = panels_for(rec, (140, 84), grid_thw=torch.tensor([1, 6, 10]))
    assert p.grid == (3, 5) and p.kept == (0, 14)


def _bright_cells(image, panels):
    out = overlay(image, panels, dim=0.0)
    total, x0 = 0, 0
    for p in panels:
        rows, cols = p.grid
        cell = int(np.ceil(demo.PANEL_PX / max(rows, cols)))
        part = np.asarray(out)[: rows * cell, x0 : x0 + cols * cell].reshape(rows, cell, cols, cell, 3)
        total += int((part.max(axis=(1, 3, 4)) > 0).sum())
        x0 += cols * cell + 8
    return total


def test_real_next_record_on_its_grids():
    """A tiny LLaVA-NeXT, a wide image (1 x 2 crops, rows cut by unpadding): the panels are the 4 x 4 base
    view and the 2 x 8 high-res grid, and exactly ``after`` cells are bright."""
    from test_llava_next_hf import HIGH, SIZES, SIDE, inputs, next_config
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(next_config()).eval()
    inp = inputs(["wide"]).to("cpu")
    with vlprune.pruned(model, "fastervlm", keep=6) as h, torch.inference_mode():
        model(**inp)
        rec = h.last[0]
    h_px, w_px = SIZES["wide"]
    panels = panels_for(rec, (w_px, h_px))
    assert [p.grid for p in panels] == [(SIDE, SIDE), HIGH["wide"]]
    image = Image.fromarray(np.random.RandomState(0).randint(1, 255, (h_px, w_px, 3), dtype=np.uint8))
    assert _bright_cells(image, panels) == rec.after == 6


def test_real_pool_record_on_next_tiles_every_panel():
    """``pool`` on a tiny LLaVA-NeXT averages every patch of each view into exactly one output: each panel's
    merged regions are disjoint, cover the whole grid, and number the outputs that view got."""
    from test_llava_next_hf import SIZES, inputs, next_config
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(next_config()).eval()
    with vlprune.pruned(model, "pool", keep=6) as h, torch.inference_mode():
        model(**inputs(["wide"]).to("cpu"))
        rec = h.last[0]
    h_px, w_px = SIZES["wide"]
    for p in panels_for(rec, (w_px, h_px)):
        cells = sorted(i for g in p.merged for i in g)
        assert cells == list(range(p.grid[0] * p.grid[1])) and len(p.merged) == len(p.kept) > 1


def test_real_qwen_record_on_its_merged_grid():
    """A tiny Qwen2.5-VL, an 84 x 140 image: 6 x 10 patches, merged 3 x 5; the panel has the image's
    aspect and exactly ``after`` bright cells."""
    from test_qwen2_5_vl import WIDE, build_qwen, inputs

    model = build_qwen().to("cpu")
    inp = {k: v.to("cpu") for k, v in inputs(("a", [WIDE], "b")).items()}
    with vlprune.pruned(model, "uniform", keep=4) as h, torch.inference_mode():
        model(**inp)
        rec = h.last[0]
    (p,) = panels_for(rec, (WIDE[1], WIDE[0]), grid_thw=inp["image_grid_thw"][0])
    assert p.grid == (3, 5) and rec.before == 15
    image = Image.fromarray(np.full((WIDE[0], WIDE[1], 3), 77, dtype=np.uint8))
    assert _bright_cells(image, [p]) == rec.after == 4


# -- input checks ------------------------------------------------------------------------------------
def test_not_an_image(tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("this is text, not a PNG")
    with pytest.raises(DemoInputError, match="not an image"):
        demo.load_image(bad)
    with pytest.raises(DemoInputError, match="Upload an image"):
        demo.load_image(None)


def test_image_too_large(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    assert demo.load_image(path).size == (200, 100)
    monkeypatch.setattr(demo, "MAX_PIXELS", 200 * 100 - 1)
    with pytest.raises(DemoInputError, match=r"200x100 pixels .* limit"):
        demo.load_image(path)
    monkeypatch.setattr(demo, "MAX_BYTES", 10)
    with pytest.raises(DemoInputError, match="MB; the limit is"):
        demo.load_image(path)


def test_question_methods_budget():
    assert demo.check_question("  what ?  ") == "what ?"
    with pytest.raises(DemoInputError, match="Type a question"):
        demo.check_question("   ")
    with pytest.raises(DemoInputError, match="limit is"):
        demo.check_question("x" * (demo.MAX_QUESTION + 1))
    assert demo.check_methods("fastervlm, uniform,fastervlm") == ["fastervlm", "uniform"]
    with pytest.raises(DemoInputError, match="Unknown method.*fastervml"):
        demo.check_methods(["fastervml"])
    with pytest.raises(DemoInputError, match="at least one"):
        demo.check_methods([])
    assert demo.check_budget("ratio", 0.75, None, 256) == {"ratio": 0.75}
    assert demo.check_budget("keep", None, 256.0, 256) == {"keep": 256}
    for mode, ratio, keep in [("ratio", 1.0, None), ("ratio", -0.1, None), ("ratio", None, None),
                              ("keep", None, 0), ("keep", None, 257), ("keep", None, 2.5), ("tokens", 0.5, 5)]:
        with pytest.raises(DemoInputError, match="ratio|keep|Budget"):
            demo.check_budget(mode, ratio, keep, 256)


def test_answer_checked_against_the_expected_answer():
    assert demo.is_correct("green", "green") and demo.is_correct("The cat is Orange.", "orange")
    assert demo.is_correct("top left", "top left") and not demo.is_correct("top right", "top left")
    assert demo.is_correct("two", "one") is False and demo.is_correct("one", "  ") is None
    assert not demo.is_correct("someone", "one")  # whole words only
    assert demo.check_expected("  orange ") == "orange"
    with pytest.raises(DemoInputError, match="expected answer .* limit"):
        demo.check_expected("x" * (demo.MAX_EXPECTED + 1))


def test_every_method_has_a_one_line_description():
    """The page lists each registered method with its class's own ``summary`` (no second list to drift)."""
    from vlprune.registry import get_method

    for name in vlprune.methods():
        text = demo.method_summary(name)
        assert text and "\n" not in text and len(text) < 160, name
        assert text == (get_method(name).summary or text)


def test_samples_index_errors_name_the_missing_field(tmp_path, monkeypatch):
    (tmp_path / "samples.json").write_text('[{"file": "a.jpg", "question": "what ?"}]')
    monkeypatch.setattr(demo, "samples_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="sample 0 lacks answer"):
        demo.sample_examples()


def test_parser_defaults_to_loopback():
    args = demo.parser().parse_args([])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, None)


CHAT = ("<s> {% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|> <|image_pad|> <|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}")


def test_checkpoint_engine_qwen(tmp_path):
    """``--model PATH``: a tiny Qwen2.5-VL checkpoint + processor (with a chat template) loaded through
    AutoModelForImageTextToText/AutoProcessor; the prompt comes from the chat template, two methods run
    and each overlay is on the merged grid of this image (84 x 140 px -> 3 x 5 merged tokens)."""
    from test_qwen2_5_vl import WIDE, build_qwen, picture, processor

    build_qwen(tmp_path)
    proc = processor()
    proc.chat_template = CHAT
    proc.save_pretrained(tmp_path)
    engine = demo.Engine.from_pretrained(str(tmp_path), device="cpu", dtype="float32", max_new_tokens=3, repeats=1)
    assert engine.prompt("what is in the picture ?").startswith("<s> <|vision_start|> <|image_pad|>")
    image = picture(WIDE, seed=3)
    inputs = engine.inputs(image, "what is in the picture ?")
    assert engine.visual_tokens(inputs) == 15
    result = engine.compare(image, inputs, ["uniform", "fastervlm"], {"keep": 4})
    base, *runs = result.runs
    assert base.error is None and base.lm_tokens == inputs["input_ids"].shape[1]
    for run in runs:
        assert run.error is None and run.visual == (15, 4) and run.lm_tokens == base.lm_tokens - 11
        assert [(p.grid, len(p.kept)) for p in run.panels] == [((3, 5), 4)]
    status, table, gallery, _details = demo.render(result, image)
    assert status.startswith("Done: 2 method(s) at keep=4") and len(gallery) == 3 and "15 → 4" in table
