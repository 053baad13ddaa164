"""vlprune-eval's grid, cache/resume, failure handling and writers; one real sweep on a tiny checkpoint."""
from __future__ import annotations

import csv
import json
import re

import pytest

pytest.importorskip("lmms_eval")

import eval_tiny  # noqa: E402
from vlprune import VlpruneError  # noqa: E402
from vlprune.eval import report, sweep  # noqa: E402
from vlprune.eval.cells import Cell, grid  # noqa: E402
from vlprune.eval.sweep import Config, Sweep  # noqa: E402


def test_grid_runs_the_baseline_once():
    cells = grid(["pool", "visual_exit", "fastervlm"], ratios=[0, 0.5, 0.889])
    assert cells[0] == Cell() and [c.key for c in cells].count("unpruned") == 1
    assert [c.key for c in cells[1:]] == ["pool-ratio0.5", "pool-ratio0.889", "visual_exit-own",
                                         "fastervlm-ratio0.5", "fastervlm-ratio0.889"]
    assert [c.key for c in grid(["pool"], keeps=[192, 64])] == ["unpruned", "pool-keep192", "pool-keep64"]
    with pytest.raises(VlpruneError, match="not both"):
        grid(["pool"], ratios=[0.5], keeps=[64])
    with pytest.raises(VlpruneError, match="Did you mean 'hiprune'"):
        grid(["hiprun"], ratios=[0.5])
    with pytest.raises(VlpruneError, match=r"ratio must be in \[0, 1\)"):
        grid(["pool"], ratios=[1.2])


class Fake:
    """An evaluate() that counts calls and fails for chosen cells."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cell, folder):
        self.calls.append(cell.key)
        if cell.key in self.fail:
            raise RuntimeError(f"boom in {cell.key}")
        kept = {None: 576, 0.75: 144, 0.889: 64}[cell.ratio]
        acc = 0.8 * (kept / 576) ** 0.1
        return {"metrics": {"gqa": {"exact_match": acc}, "pope": {"pope_accuracy": acc + 0.05, "pope_f1_score": 0.5}},
                "stderr": {"gqa": {"exact_match": 0.04}, "pope": {"pope_accuracy": 0.021}},
                "n": {"gqa": 120, "pope": 500}, "prefill_ms": kept / 10, "kept_tokens": kept}


def cells():
    return grid(["pool", "fastervlm"], ratios=[0.75, 0.889])


def test_finished_cells_are_not_recomputed(tmp_path):
    fake = Fake()
    first = Sweep(Config(tasks=["gqa", "pope"]), tmp_path, log=lambda m: None, evaluate=fake)
    first.run(cells())
    assert fake.calls == [c.key for c in cells()] and first.cached == []
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/cell.json")}
    fake.calls.clear()
    lines = []
    again = Sweep(Config(tasks=["gqa", "pope"]), tmp_path, log=lines.append, evaluate=fake)
    records = again.run(cells())
    assert fake.calls == [] and again.computed == [] and again.cached == [c.key for c in cells()]
    assert any("resuming: 5 of 5" in m for m in lines)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/cell.json")} == stamp
    assert [r["key"] for r in records] == [c.key for c in cells()]
    # another configuration (here: a limit) does not reuse those cells
    fake.calls.clear()
    Sweep(Config(tasks=["gqa", "pope"], limit=10), tmp_path, log=lambda m: None, evaluate=fake).run(cells()[:2])
    assert fake.calls == ["unpruned", "pool-ratio0.75"]
    # nor do other weights under the same model name (a retrained checkpoint)
    fake.calls.clear()
    Sweep(Config(tasks=["gqa", "pope"], weights="other"), tmp_path, log=lambda m: None, evaluate=fake).run(cells()[:1])
    assert fake.calls == ["unpruned"]


def test_weights_digest_follows_the_weight_files(tmp_path):
    from vlprune.eval.sweep import model_weights

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(bytes(3 << 20))
    first = model_weights(str(tmp_path))
    assert first and model_weights(str(tmp_path)) == first
    (tmp_path / "README.md").write_text("notes")  # not a weight file
    assert model_weights(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(bytes(3 << 20)[:-1] + b"x")  # retrained: last bytes differ
    assert model_weights(str(tmp_path)) != first
    assert len(model_weights("embedded")) == 16  # the shipped checkpoint


def test_an_interrupted_sweep_resumes(tmp_path):
    class Interrupt(Fake):
        def __call__(self, cell, folder):
            if cell.key == "fastervlm-ratio0.75":
                raise KeyboardInterrupt
            return super().__call__(cell, folder)

    with pytest.raises(KeyboardInterrupt):
        Sweep(Config(), tmp_path, log=lambda m: None, evaluate=Interrupt()).run(cells())
    fake = Fake()
    Sweep(Config(), tmp_path, log=lambda m: None, evaluate=fake).run(cells())
    assert fake.calls == ["fastervlm-ratio0.75", "fastervlm-ratio0.889"]


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    fake = Fake(fail={"pool-ratio0.889"})
    s = Sweep(Config(), tmp_path, log=lambda m: None, evaluate=fake)
    records = s.run(cells())
    assert fake.calls == [c.key for c in cells()] and s.failed == ["pool-ratio0.889"]
    bad = json.loads((tmp_path / "runs/pool-ratio0.889/cell.json").read_text())
    assert bad["status"] == "failed" and "RuntimeError: boom in pool-ratio0.889" in bad["error"]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["error"] for r in rows if r["status"] == "failed"] == ["RuntimeError: boom in pool-ratio0.889"]
    assert "Failed cells" in (tmp_path / "results.md").read_text()
    assert sum(r["status"] == "ok" for r in records) == 4
    fake2 = Fake()
    Sweep(Config(), tmp_path, log=lambda m: None, evaluate=fake2).run(cells())
    assert fake2.calls == ["pool-ratio0.889"]  # only the failed cell is retried


def test_table_values_equal_the_csv(tmp_path):
    Sweep(Config(), tmp_path, log=lambda m: None, evaluate=Fake()).run(cells())
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["task"] for r in rows} == {"gqa", "pope"}
    base = {(r["task"], r["metric"]): float(r["value"]) for r in rows if r["method"] == "unpruned"}
    for r in rows:
        assert float(r["pct_of_unpruned"]) == pytest.approx(100 * float(r["value"]) / base[(r["task"], r["metric"])],
                                                             abs=0.05)  # values are rounded to 4 places
    md = (tmp_path / "results.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-1] == "avg % of unpruned"
    assert header[2:4] == ["gqa (exact_match, n=120)", "pope (pope_accuracy, n=500)"]
    budget = None
    checked = 0
    for ln in lines[1:]:
        cols = [c.strip() for c in ln.strip("|").split("|")]
        if cols[0].startswith("**"):
            budget = cols[0].strip("*")
            continue
        mine = {(r["task"], r["metric"]): r for r in rows if r["method"] == cols[0]
                and r["budget"] == (budget or "unpruned")}
        assert cols[2] == f'{mine[("gqa", "exact_match")]["value"]} ± 0.04'  # value ± standard error
        assert cols[3] == f'{mine[("pope", "pope_accuracy")]["value"]} ± 0.021'
        assert mine[("gqa", "exact_match")]["stderr"] == "0.04" and mine[("gqa", "exact_match")]["n"] == "120"
        assert cols[1] == mine[("gqa", "exact_match")]["kept_tokens"]
        pcts = [float(mine[k]["pct_of_unpruned"]) for k in (("gqa", "exact_match"), ("pope", "pope_accuracy"))]
        assert cols[-1] == f"{sum(pcts) / 2:.1f} %"
        checked += 1
    assert checked == 5
    assert re.search(r"\| \*\*ratio 0.889\*\* \|", md)
    assert "± is one standard error" in md
    for name in ("accuracy_gqa.png", "accuracy_pope.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert [json.loads(x)["value"] for x in open(tmp_path / "results.jsonl")] == [float(r["value"]) for r in rows]


def test_real_sweep_on_a_tiny_checkpoint_resumes(tmp_path):
    ckpt = eval_tiny.save_checkpoint(tmp_path / "ckpt")
    tasks = eval_tiny.write_task(tmp_path / "tasks" / "tiny")
    config = Config(model=str(ckpt), base="llava_hf", tasks=[eval_tiny.TASK], limit=2, include_path=[str(tasks)],
                    log_samples=True)
    out = tmp_path / "out"
    s = Sweep(config, out, log=lambda m: None)
    s.task_manager = lambda: _tm(tasks)
    records = s.run(grid(["pool", "fastervlm"], keeps=[4], options={"fastervlm": {"layer": -3}}))
    assert [r["status"] for r in records] == ["ok"] * 3, [r.get("error") for r in records]
    assert [r["kept_tokens"] for r in records] == [16, 4, 4]
    assert all(r["prefill_ms"] > 0 for r in records)
    assert records[2]["patch"]["options"] == {"layer": -3}
    assert all(r["n"] == {eval_tiny.TASK: 2} and "accuracy" in r["stderr"][eval_tiny.TASK] for r in records)
    results = json.loads((out / "runs/pool-keep4/lmms_eval_results.json").read_text())
    assert results["config"]["model_backend"].endswith("LlavaHf+vlprune(pool keep=4) (chat)")
    for key, kept in (("unpruned", None), ("pool-keep4", [4]), ("fastervlm-keep4-layer=-3", [4])):
        samples = [json.loads(x) for x in open(out / "runs" / key / f"samples_{eval_tiny.TASK}.jsonl")]
        assert [x["doc_id"] for x in samples] == [0, 1] and all(x["visual_tokens_kept"] == kept for x in samples)
        assert all(isinstance(x["filtered_resps"][0], str) and "accuracy" in x for x in samples)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["task"], r["metric"]) for r in rows} >= {("fastervlm", eval_tiny.TASK, "accuracy")}
    again = Sweep(config, out, log=lambda m: None)
    again.run(grid(["pool", "fastervlm"], keeps=[4], options={"fastervlm": {"layer": -3}}))
    assert again.computed == [] and again._lm is None  # nothing evaluated, the model not even loaded


def _tm(folder):
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=[str(folder)], include_defaults=False)


def test_report_handles_a_sweep_without_baseline(tmp_path):
    records = [{"key": "pool-keep4", "cell": {"method": "pool", "keep": 4}, "budget": "keep 4", "status": "ok",
                "metrics": {"t": {"m": 0.5}}, "kept_tokens": 4, "prefill_ms": 1.0}]
    report.write_all(tmp_path, records, "m")
    assert "| pool | 4 | 0.5 | 1 |  |" in (tmp_path / "results.md").read_text()


def test_sweep_module_defaults_point_at_the_offline_task():
    assert sweep.DEFAULTS["tasks"] == sweep.SCENES_TASK and sweep.DEFAULTS["model"] == sweep.EMBEDDED


def test_cache_keys_are_exact_and_old_rounded_cells_are_not_reused(tmp_path):
    near = grid(["pool"], ratios=[0.4980468, 0.4980469])
    assert [c.key for c in near[1:]] == ["pool-ratio0.4980468", "pool-ratio0.4980469"]
    assert near[1].budget != near[2].budget
    # the options are part of the key: another layer is another cell
    assert grid(["fastervlm"], keeps=[64], options={"fastervlm": {"layer": -3}})[1].key == "fastervlm-keep64-layer=-3"
    assert grid(["fastervlm"], keeps=[64])[1].key == "fastervlm-keep64"
    assert grid(["pool"], keeps=[64], positions="original")[1].key == "pool-keep64-positions=original"
    # a folder written by an older version under a rounded key (ratio 0.4980468 as "0.498047")
    old = tmp_path / "runs" / "pool-ratio0.498047"
    old.mkdir(parents=True)
    (old / "cell.json").write_text(json.dumps({"cell": {"method": "pool", "ratio": 0.4980468, "keep": None},
                                               "status": "ok", "config": Config().fingerprint(),
                                               "metrics": {"gqa": {"exact_match": 0.1}}}))
    lines, calls = [], []
    s = Sweep(Config(), tmp_path, log=lines.append, evaluate=lambda c, d: calls.append(c.key) or
              {"metrics": {"gqa": {"exact_match": 0.5}}})
    s.run(grid(["pool"], ratios=[0.498047]))
    assert calls == ["unpruned", "pool-ratio0.498047"], lines
    assert any("holds another run" in m for m in lines)


def test_duplicate_budgets_run_once_and_say_so_once():
    notes = []
    cells = grid(["pool", "pool"], ratios=[0.75, 0.75, 0.5, 0.75], note=notes.append)
    assert [c.key for c in cells] == ["unpruned", "pool-ratio0.75", "pool-ratio0.5"]
    assert notes == ["--methods lists pool more than once; each runs once",
                     "--ratios lists 0.75 more than once; each runs once"]
    notes.clear()
    assert len(grid(["pool"], keeps=[64, 64], note=notes.append)) == 2 and len(notes) == 1


def test_method_options_are_checked_by_the_method():
    with pytest.raises(VlpruneError, match=r"fastervlm:lyr=1: unknown option\(s\) lyr .*allowed: layer"):
        grid(["fastervlm"], keeps=[4], options={"fastervlm": {"lyr": 1}})
    with pytest.raises(VlpruneError, match=r"layer must be an int for method='fastervlm'; got layer='x'"):
        grid(["fastervlm"], keeps=[4], options={"fastervlm": {"layer": "x"}})
    with pytest.raises(VlpruneError, match=r"options of method 'hiprune', which this sweep does not run"):
        grid(["fastervlm"], keeps=[4], options={"hiprune": {"alpha": 0.1}})
    with pytest.raises(VlpruneError, match="Did you mean 'fastervlm'"):
        grid(["fastervlm"], keeps=[4], options={"fastrvlm": {"layer": -3}})
    with pytest.raises(VlpruneError, match="--positions must be one of contiguous, original; got 'first'"):
        grid(["pool"], keeps=[4], positions="first")
    cell = grid(["fastervlm"], keeps=[4], options={"fastervlm": {"layer": -3}}, positions="original")[1]
    assert cell.patch_kwargs() == {"method": "fastervlm", "keep": 4, "layer": -3, "positions": "original"}


@pytest.mark.parametrize("content, why", [("[1, 2]", "holds a JSON list"),
                                          ('{"status": "ok", "config": {}}', "has no valid 'metrics'"),
                                          ('{"status": "ok", "metrics": [1]}', "has no valid 'metrics'"),
                                          ('{"status": "ok", ', "is not valid JSON")])
def test_malformed_cells_are_recomputed_with_a_warning(tmp_path, content, why):
    fake = Fake()
    Sweep(Config(), tmp_path, log=lambda m: None, evaluate=fake).run(cells())
    (tmp_path / "runs" / "pool-ratio0.75" / "cell.json").write_text(content)
    fake.calls.clear()
    lines = []
    Sweep(Config(), tmp_path, log=lines.append, evaluate=fake).run(cells())
    assert fake.calls == ["pool-ratio0.75"]
    warnings = [m for m in lines if m.startswith("warning:")]
    assert len(warnings) == 1 and why in warnings[0] and "pool-ratio0.75/cell.json" in warnings[0], lines
    assert json.loads((tmp_path / "runs" / "pool-ratio0.75" / "cell.json").read_text())["status"] == "ok"


def test_cells_without_samples_are_recomputed_when_samples_are_asked_for(tmp_path):
    fake = Fake()
    Sweep(Config(), tmp_path, log=lambda m: None, evaluate=fake).run(cells()[:2])
    fake.calls.clear()
    lines = []
    Sweep(Config(log_samples=True), tmp_path, log=lines.append, evaluate=fake).run(cells()[:2])
    assert fake.calls == ["unpruned", "pool-ratio0.75"]
    assert any("no per-sample answers" in m for m in lines)


def test_summary_keeps_lmms_evals_standard_errors_and_n():
    results = {"results": {"t": {"alias": "t", "accuracy,none": 0.5, "accuracy_stderr,none": 0.1,
                                 "accuracy_stderr_clt,none": 0.11, "acc_color,none": 0.4,
                                 "acc_color_stderr,none": "N/A", "f1,strict": 0.7, "f1_stderr,strict": 0.05}},
               "n-samples": {"t": {"original": 100, "effective": 0.25}}}
    out = sweep.summary_of(results)
    assert out["metrics"] == {"t": {"accuracy": 0.5, "acc_color": 0.4, "f1,strict": 0.7}}
    assert out["stderr"] == {"t": {"accuracy": 0.1, "f1,strict": 0.05}}  # lmms-eval's own, not the CLT one
    assert out["n"] == {"t": 25}  # a fractional limit: ceil(0.25 x 100)


def test_plots_use_a_log_axis_error_bars_and_a_style_per_method(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    styles = [report.style(m) for m in vlprune_methods()]
    assert len({s[0] for s in styles}) == len(styles) and len({s[1] for s in styles}) == len(styles)
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    records = [Sweep(Config(), tmp_path, log=lambda m: None, evaluate=Fake()).run_cell(c)
               for c in grid(["divprune", "uniform", "pool"], ratios=[0.75, 0.889])]
    report.plots(records, "m", tmp_path)
    gqa = figures[0].axes[0]
    assert gqa.get_xscale() == "log" and "n=120" in gqa.get_title()
    bars = gqa.containers
    assert len(bars) == 3 and all(b.has_yerr for b in bars)
    colours = {tuple(b.lines[0].get_color()) if not isinstance(b.lines[0].get_color(), str)
               else b.lines[0].get_color() for b in bars}
    assert len(colours) == 3 and len({b.lines[0].get_marker() for b in bars}) == 3
    xs = [b.lines[0].get_xdata()[0] for b in bars]  # the same budget: nudged apart, not on top of each other
    assert len(set(xs)) == 3


def vlprune_methods():
    from vlprune.registry import method_names

    return method_names()
