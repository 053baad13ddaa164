"""The demo server end to end (eval/demo.py): the embedded model served on loopback, called through
``gradio_client`` at the named endpoint ``/compare``; bad input answered with a message; and concurrent
requests with different methods and budgets each getting their own result (measured against sequential
runs), with a control that shows what the engine's lock prevents."""
import concurrent.futures
import threading
import time

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


def compare(client, image, question, methods, mode="ratio", ratio=0.75, keep=64):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), question, methods, mode, ratio, keep, api_name="/compare")


def test_samples_ship_with_the_package():
    assert len(SAMPLES) >= 3 and all(Image.open(path).size == (224, 224) for path, _ in SAMPLES)


def test_two_methods_answers_and_overlays(client):
    image, question = SAMPLES[0]  # "what color is the cross ?" -> green
    status, table, gallery, details = compare(client, image, question, ["fastervlm", "uniform"])
    assert status.startswith("Done: 2 method(s) at ratio=0.75"), status
    runs = {r["method"]: r for r in details["runs"]}
    assert list(runs) == [None, "fastervlm", "uniform"]
    assert runs[None]["answer"] == "green"  # the embedded model answers this sample correctly unpruned
    for name in ("fastervlm", "uniform"):
        r = runs[name]
        assert r["error"] is None and r["answer"] and (r["visual_before"], r["visual_after"]) == (256, 64)
        assert r["grids"] == [[16, 16]] and len(r["kept"][0]) == 64 and r["lm_tokens"] == runs[None]["lm_tokens"] - 192
        assert r["prefill_ms"] > 0 and r["speedup"] > 0
        assert f"| {name} | **{r['answer']}** | 256 → 64 |" in table
    assert runs["fastervlm"]["kept"] != runs["uniform"]["kept"]
    # the gallery: the image, then one overlay per method, drawn as files the client downloaded
    assert len(gallery) == 3 and gallery[1]["caption"].startswith("fastervlm: ")
    over = Image.open(gallery[1]["image"]).convert("L")  # the client downloads each file and gives its path
    assert over.size == (448, 448)  # 16 x 16 cells of 28 px
    bright = [over.getpixel((c * 28 + 14, r * 28 + 14)) for r in range(16) for c in range(16)]
    src = Image.open(image).convert("L").resize((16, 16), Image.BOX)
    ratio = [b / max(src.getpixel((i % 16, i // 16)), 1) for i, b in enumerate(bright)]
    kept = set(runs["fastervlm"]["kept"][0])
    assert min(ratio[i] for i in kept) > 0.6 and max(ratio[i] for i in range(256) if i not in kept) < 0.45


def test_keep_budget_and_unbudgeted_method(client):
    image, question = SAMPLES[1]
    status, _table, _gallery, details = compare(client, image, question, ["pool", "visual_exit"], mode="keep", keep=16)
    assert status.startswith("Done"), status
    pool, exit_ = details["runs"][1:]
    assert pool["visual_after"] == 16 and exit_["visual_after"] == 0  # visual_exit decides by itself


@pytest.mark.parametrize("case, message", [
    ("not_image", "not an image"), ("empty_question", "Type a question"),
    ("keep_too_big", "between 1 and 256"), ("no_methods", "at least one"), ("huge", "limit is"),
])
def test_bad_input_gets_a_message_not_a_trace(client, tmp_path, monkeypatch, case, message):
    image, question = SAMPLES[0]
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

    image, question = SAMPLES[0]
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
        return compare(client, *SAMPLES[sample], methods, **budget)[3]

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
    path, question = SAMPLES[0]
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
        status = compare(Client(f"http://127.0.0.1:{port}/", verbose=False), *SAMPLES[0], ["fastervlm"])[0]
        assert status.startswith("Done: 1 method(s)"), status
    finally:
        proc.terminate()
        proc.wait(30)
