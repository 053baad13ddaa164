"""The demo server end to end (eval/demo.py): the embedded model served on loopback, called through
``gradio_client`` at the named endpoint ``/compare``: answers marked against a sample's expected answer,
the table also returned as JSON, merging methods' regions; bad input answered with a message; and
concurrent requests with different methods and budgets each getting their own result (measured against
sequential runs), with a control that shows what the engine's lock prevents."""
import concurrent.futures
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo_server import serve
from vlprune.eval import demo

SAMPLES = demo.sample_examples()


@pytest.fixture(scope="module")
def engine():
    return demo.Engine.embedded("cpu", repeats=1)


@pytest.fixture(scope="module")
def client(engine):
    from gradio_client import Client

    with serve(engine, concurrency=4) as url:
        yield Client(url, verbose=False)


def compare(client, image, question, methods, mode="ratio", ratio=0.75, keep=64, expected=None):
    """Calls ``/compare``; without ``expected`` with the six arguments the endpoint took before it had one."""
    from gradio_client import handle_file

    args = [handle_file(str(image)), question, methods, mode, ratio, keep] + ([expected] if expected is not None else [])
    return client.predict(*args, api_name="/compare")


def test_samples_ship_with_the_package():
    """Synthetic scenes and at least two real photographs, each small, with a question and expected answer."""
    scenes = [path for path, _, _ in SAMPLES if Path(path).name.startswith("scene-")]
    photos = [path for path, _, _ in SAMPLES if Path(path).name.startswith("photo-")]
    assert len(scenes) >= 3 and all(Image.open(path).size == (224, 224) for path in scenes)
    assert len(photos) >= 2 and all(min(Image.open(path).size) >= 224 for path in photos)
    assert all(question and answer for _, question, answer in SAMPLES)
    assert all(Path(path).stat().st_size <= 60_000 for path, _, _ in SAMPLES)


def table_rows(table: str) -> list[list[str]]:
    """The Markdown table's body rows as lists of cells."""
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]  # without the header
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_two_methods_answers_overlays_and_the_table_as_json(client):
    image, question, expected = SAMPLES[0]  # "what color is the cross ?" -> green
    status, table, gallery, details = compare(client, image, question, ["fastervlm", "uniform"], expected=expected)
    assert status.startswith("Done: 2 method(s) at ratio=0.75"), status
    runs = {r["method"]: r for r in details["runs"]}
    assert list(runs) == [None, "fastervlm", "uniform"]
    assert runs[None]["answer"] == "green" and runs[None]["correct"] is True  # right unpruned
    assert details["expected"] == "green" and "Expected answer: **green**" in table
    for name in ("fastervlm", "uniform"):
        r = runs[name]
        assert r["error"] is None and r["answer"] and (r["visual_before"], r["visual_after"]) == (256, 64)
        assert r["grids"] == [[16, 16]] and len(r["kept"][0]) == 64 and r["lm_tokens"] == runs[None]["lm_tokens"] - 192
        assert r["prefill_ms"] > 0 and r["speedup"] > 0 and r["merged"] == [[]]
        assert r["correct"] is (r["answer"] == "green") and r["summary"] == demo.method_summary(name)
        mark = "✓" if r["correct"] else "✗"
        assert f"| {name} | **{r['answer']}** {mark} | 256 → 64 |" in table
        assert f"- **{name}**: {r['summary']}" in table  # the one-line description under the table
    # the JSON output is the table's rows as values (an API caller need not parse Markdown)
    rows = table_rows(table)
    assert [row[0] for row in rows] == ["unpruned", "fastervlm", "uniform"]
    for row, r in zip(rows, details["runs"]):
        assert row[1].startswith(f"**{r['answer']}**") and row[3] == str(r["lm_tokens"])
        assert row[4] == f"{r['prefill_ms']:.1f}" + ("*" if r["noisy"] else "")
    assert runs["fastervlm"]["kept"] != runs["uniform"]["kept"]
    # the gallery: the image, then one overlay per method, drawn as files the client downloaded
    assert len(gallery) == 3 and gallery[1]["caption"].startswith("fastervlm: ")
    assert gallery[0]["caption"] == "unpruned: green ✓ · all 256 tokens"
    over = Image.open(gallery[1]["image"]).convert("L")  # the client downloads each file and gives its path
    assert over.size == (448, 448)  # 16 x 16 cells of 28 px
    bright = [over.getpixel((c * 28 + 14, r * 28 + 14)) for r in range(16) for c in range(16)]
    src = Image.open(image).convert("L").resize((16, 16), Image.BOX)
    ratio = [b / max(src.getpixel((i % 16, i // 16)), 1) for i, b in enumerate(bright)]
    kept = set(runs["fastervlm"]["kept"][0])
    assert min(ratio[i] for i in kept) > 0.6 and max(ratio[i] for i in range(256) if i not in kept) < 0.45


def test_the_api_lists_its_json_output(client):
    outputs = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/compare"]["returns"]
    assert [o["component"] for o in outputs] == ["Markdown", "Markdown", "Gallery", "Json"]


@pytest.mark.parametrize("index", [i for i, (path, _, _) in enumerate(SAMPLES) if Path(path).name.startswith("photo-")])
def test_photographs_answered_and_marked_against_their_expected_answer(client, index):
    """Whatever the embedded model answers on a photograph (it was trained on synthetic scenes), the page
    marks it against the sample's expected answer, the same way in the table and the JSON."""
    image, question, expected = SAMPLES[index]
    status, table, gallery, details = compare(client, image, question, ["fastervlm"], expected=expected)
    assert status.startswith("Done"), status
    for r, row in zip(details["runs"], table_rows(table)):
        assert r["correct"] is demo.is_correct(r["answer"], expected) is not None
        assert row[1] == f"**{r['answer']}** {'✓' if r['correct'] else '✗'}"
    assert f"Expected answer: **{expected}**" in table and len(gallery) == 2


def test_merging_methods_report_the_region_each_token_averages(client):
    """pool averages 16 disjoint cells that tile the grid; prumerge_plus merges each kept patch with key
    neighbours (overlapping; each patch is drawn in the region of the output that weighs it most); visionzip's contextual tokens merge, its dominant
    tokens do not; fastervlm merges nothing. The overlays the page shows are exactly :func:`demo.overlay`
    of those regions (up to the gallery's image compression)."""
    from vlprune.registry import get_method

    image, question, _ = SAMPLES[0]
    methods = ["pool", "prumerge_plus", "visionzip", "fastervlm"]
    status, _table, gallery, details = compare(client, image, question, methods, mode="keep", keep=16)
    assert status.startswith("Done: 4 method(s)"), status
    runs = {r["method"]: r for r in details["runs"][1:]}
    for name, r in runs.items():
        (kept,), (merged,) = r["kept"], r["merged"]
        cells = [i for g in merged for i in g]
        assert len(cells) == len(set(cells)), name  # the regions do not overlap
        assert all(len([k for k in kept if k in g]) == 1 for g in merged), name  # one output token per region
        if name == "pool":
            assert len(merged) == 16 and sorted(cells) == list(range(256))
        elif name == "prumerge_plus":
            assert len(merged) == 16 and len(cells) > 16  # (a patch shared by several goes to one of them)
        elif name == "visionzip":
            assert len(merged) == get_method("visionzip")().split(16)[1] > 0
        else:
            assert merged == []
    src = demo.load_image(image)
    for item, name in zip(gallery[1:], methods):
        r = runs[name]
        panel = demo.Panel(tuple(r["grids"][0]), tuple(r["kept"][0]), (0, 0, 224, 224), merged=tuple(map(tuple, r["merged"][0])))
        want = np.asarray(demo.overlay(src, [panel]), dtype=np.float64)
        got = np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.float64)
        assert got.shape == want.shape and np.abs(got - want).mean() < 6, name
        assert ("average a coloured, outlined region" in item["caption"]) == (name != "fastervlm"), item["caption"]


def test_keep_budget_and_unbudgeted_method(client):
    image, question, _ = SAMPLES[1]
    status, _table, _gallery, details = compare(client, image, question, ["pool", "visual_exit"], mode="keep", keep=16)
    assert status.startswith("Done"), status
    pool, exit_ = details["runs"][1:]
    assert pool["visual_after"] == 16 and exit_["visual_after"] == 0  # visual_exit decides by itself


@pytest.mark.parametrize("case, message", [
    ("not_image", "not an image"), ("empty_question", "Type a question"),
    ("keep_too_big", "between 1 and 256"), ("no_methods", "at least one"), ("huge", "limit is"),
    ("long_expected", "expected answer is 101 characters"),
])
def test_bad_input_gets_a_message_not_a_trace(client, tmp_path, monkeypatch, case, message):
    image, question, _ = SAMPLES[0]
    args = dict(image=image, question=question, methods=["fastervlm"])
    if case == "not_image":
        args["image"] = tmp_path / "x.png"
        args["image"].write_bytes(b"\x89PNG but not really")
    elif case == "empty_question":
        args["question"] = "   "
    elif case == "keep_too_big":
        args.update(mode="keep", keep=1000)
    elif case == "no_methods":
        args["methods"] = []
    elif case == "long_expected":
        args["expected"] = "x" * 101
    elif case == "huge":
        monkeypatch.setattr(demo, "MAX_PIXELS", 224 * 224 - 1)  # the server runs in this process
    status, table, gallery, details = compare(client, args.pop("image"), args.pop("question"), args.pop("methods"), **args)
    assert status.startswith("**Error:**") and message in status, status
    assert "Traceback" not in status and (table, gallery) == ("", []) and "error" in details


@pytest.mark.parametrize("change, message", [
    ({"ratio": 1.5}, "greater than maximum value 0.99"), ({"ratio": -0.5}, "less than minimum value 0"),
    ({"methods": ["fastervml"]}, "'fastervml' .* not in the list of choices"), ({"mode": "tokens"}, "not in the list of choices"),
])
def test_values_no_control_can_hold_are_refused_by_gradio(client, change, message):
    """A ratio past the slider, a method or budget mode that is not a choice: only an API caller can send
    these, and Gradio's own component checks refuse them with a message (before the handler runs)."""
    from gradio_client.exceptions import AppError

    image, question, _ = SAMPLES[0]
    args = {"methods": ["fastervlm"]} | change
    with pytest.raises(AppError, match=message):
        compare(client, image, question, **args)


# -- concurrency -----------------------------------------------------------------------------------
REQUESTS = [  # (sample, methods, budget): all different, so any mixing shows
    (0, ["fastervlm", "uniform"], {"mode": "ratio", "ratio": 0.75}),
    (1, ["pool"], {"mode": "keep", "keep": 16}),
    (2, ["hiprune"], {"mode": "ratio", "ratio": 0.5}),
    (3, ["vtc_cls"], {"mode": "keep", "keep": 100}),
]


def essentials(details):
    """What must not depend on other requests: per run, its method, answer, token counts and kept indices."""
    return [(r["method"], r["answer"], r["visual_after"], r["lm_tokens"], r["kept"], r["error"]) for r in details["runs"]]


def test_concurrent_requests_each_get_their_own_result(client):
    """Fire every request at once (Gradio runs up to 4 at a time): each result equals the same request run
    alone, and the server's clocks show the requests were in flight together while the model served one
    request at a time."""
    def call(req):
        sample, methods, budget = req
        return compare(client, *SAMPLES[sample][:2], methods, **budget)[3]

    sequential = [call(r) for r in REQUESTS]
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        jobs = [pool.submit(call, r) for r in REQUESTS]
        concurrent_ = [j.result(timeout=300) for j in jobs]
    for req, alone, together in zip(REQUESTS, sequential, concurrent_):
        assert essentials(together) == essentials(alone), req
        assert together["budget"] == {req[2]["mode"]: req[2][req[2]["mode"]]}
    windows = sorted(tuple(d["model_window"]) for d in concurrent_)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(windows, windows[1:])), "model turns overlapped"
    arrived = [d["model_window"][0] - d["waited_s"] for d in concurrent_]
    assert sum(a < windows[0][1] for a in arrived) >= 2, "the requests did not reach the engine together"


def slow_lm(model, seconds=0.03):
    """Make every LM call slower, so two unserialized requests are sure to overlap on the model."""
    return model.model.language_model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


@pytest.mark.parametrize("serialize", [True, False])
def test_the_lock_is_what_keeps_requests_apart(engine, serialize):
    """The same two simultaneous requests on two engines sharing one model, with and without the lock: with
    it both match their solo runs; without it (the control) some result is wrong, so the test above
    could see mixing if the lock were missing."""
    path, question, _ = SAMPLES[0]
    image = demo.load_image(path)
    inputs = engine.inputs(image, question)
    reqs = [(["fastervlm"], {"ratio": 0.75}), (["uniform"], {"keep": 9})]
    solo = [engine.compare(image, inputs, m, b) for m, b in reqs]
    shared = demo.Engine(engine.model, engine.processor, chat_template=False, max_new_tokens=engine.max_new_tokens,
                         repeats=1, serialize=serialize)
    hook = slow_lm(engine.model)
    try:
        mixed = 0
        for _attempt in range(1 if serialize else 3):  # unserialized overlap is near certain; retry anyway
            start = threading.Barrier(len(reqs))

            def go(req, start=start):
                start.wait()
                return shared.compare(image, inputs, *req)

            with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
                results = list(pool.map(go, reqs))
            got = [[(r.method, r.answer, r.visual, r.error) for r in c.runs] for c in results]
            want = [[(r.method, r.answer, r.visual, r.error) for r in c.runs] for c in solo]
            mixed += got != want
            if mixed and not serialize:
                break
    finally:
        hook.remove()
    assert "_vlprune" not in engine.model.__dict__  # every patch was removed, even the replaced ones
    assert (mixed == 0) if serialize else (mixed > 0)


@pytest.mark.slow
def test_cli_serves_on_loopback():
    """``python -m vlprune.eval.demo`` (what the ``vlprune-demo`` script runs) starts, serves the page on
    127.0.0.1 and answers ``/compare``; slow: a second process loads the model again."""
    import subprocess
    import sys
    import urllib.request

    from demo_server import free_port
    from gradio_client import Client

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlprune.eval.demo", "--port", str(port), "--repeats", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the demo did not come up"
                time.sleep(1)
        status = compare(Client(f"http://127.0.0.1:{port}/", verbose=False), *SAMPLES[0][:2], ["fastervlm"])[0]
        assert status.startswith("Done: 1 method(s)"), status
    finally:
        proc.terminate()
        proc.wait(30)
