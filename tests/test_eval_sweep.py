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
from vlprune.eval.sweep import Cell, Config, Sweep, grid  # noqa: E402


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
                "prefill_ms": kept / 10, "kept_tokens": kept}


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
    assert header[-1] == "avg % of unpruned" and header[2:4] == ["gqa (exact_match)", "pope (pope_accuracy)"]
    budget = None
    checked = 0
    for ln in lines[1:]:
        cols = [c.strip() for c in ln.strip("|").split("|")]
        if cols[0].startswith("**"):
            budget = cols[0].strip("*")
            continue
        mine = {(r["task"], r["metric"]): r for r in rows if r["method"] == cols[0]
                and r["budget"] == (budget or "unpruned")}
        assert cols[2] == mine[("gqa", "exact_match")]["value"]
        assert cols[3] == mine[("pope", "pope_accuracy")]["value"]
        assert cols[1] == mine[("gqa", "exact_match")]["kept_tokens"]
        pcts = [float(mine[k]["pct_of_unpruned"]) for k in (("gqa", "exact_match"), ("pope", "pope_accuracy"))]
        assert cols[-1] == f"{sum(pcts) / 2:.1f} %"
        checked += 1
    assert checked == 5
    assert re.search(r"\| \*\*ratio 0.889\*\* \|", md)
    for name in ("accuracy_gqa.png", "accuracy_pope.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert [json.loads(x)["value"] for x in open(tmp_path / "results.jsonl")] == [float(r["value"]) for r in rows]


def test_real_sweep_on_a_tiny_checkpoint_resumes(tmp_path):
    ckpt = eval_tiny.save_checkpoint(tmp_path / "ckpt")
    tasks = eval_tiny.write_task(tmp_path / "tasks" / "tiny")
    config = Config(model=str(ckpt), base="llava_hf", tasks=[eval_tiny.TASK], limit=2, include_path=[str(tasks)])
    out = tmp_path / "out"
    s = Sweep(config, out, log=lambda m: None)
    s.task_manager = lambda: _tm(tasks)
    records = s.run(grid(["pool", "fastervlm"], keeps=[4]))
    assert [r["status"] for r in records] == ["ok"] * 3, [r.get("error") for r in records]
    assert [r["kept_tokens"] for r in records] == [16, 4, 4]
    assert all(r["prefill_ms"] > 0 for r in records)
    assert (out / "runs/pool-keep4/lmms_eval_results.json").is_file()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["task"], r["metric"]) for r in rows} >= {("fastervlm", eval_tiny.TASK, "accuracy")}
    again = Sweep(config, out, log=lambda m: None)
    again.run(grid(["pool", "fastervlm"], keeps=[4]))
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
