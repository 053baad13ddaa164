"""The learned methods through every way a user runs a method: vlprune-eval, the lmms-eval plugin, the
demo and vlprune-bench, on the embedded model with the weights shipped for it (and, for the bench, a clear
skip where the shipped weights do not fit the model)."""
import json

import pytest

from vlprune import learned
from vlprune.errors import VlpruneError


@pytest.fixture(scope="module", autouse=True)
def shipped():
    from vlprune.embedded import asset_dir

    try:
        asset_dir()
        for method in ("atp", "dyvte", "tokenflex"):
            learned.shipped(method)
    except (FileNotFoundError, VlpruneError):
        pytest.skip("no embedded checkpoint or shipped learned weights in this copy")


def test_vlprune_eval_sweeps_learned_methods(tmp_path):
    from vlprune.eval import cli

    out = tmp_path / "out"
    assert cli.main(["--methods", "atp,dyvte,tokenflex", "--keep", "25", "--limit", "4", "--output", str(out)]) == 0
    records = {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in out.glob("runs/*/cell.json")}
    assert set(records) == {"unpruned", "atp-own", "dyvte-own", "tokenflex-keep25"}
    assert all(r["status"] == "ok" for r in records.values()), [r.get("error") for r in records.values()]
    assert records["tokenflex-keep25"]["kept_tokens"] == 25
    table = (out / "results.md").read_text()
    assert "tokenflex" in table and "dyvte" in table and "atp" in table
    assert 0 < records["atp-own"]["kept_tokens"] < 256


def test_the_plugin_runs_learned_methods_and_logs_their_counts():
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlprune.eval import plugin
    from vlprune.eval.scenes_task import task_dir

    tm = TaskManager("WARNING", include_path=[task_dir()], include_defaults=False)
    dyvte = f"method=dyvte,threshold=0.9,weights={learned.shipped('dyvte')}"  # the recipe's model args
    for args, kept in (("method=tokenflex,keep=25", {25}), (dyvte, {0, 256}), ("method=atp", set(range(256)))):
        lm = plugin.build(f"base=embedded,{args},device=cpu,device_map=cpu", {"batch_size": 2})
        out = simple_evaluate(model=lm, tasks=["vlprune_scenes"], limit=4, bootstrap_iters=0, log_samples=True,
                              task_manager=tm, verbosity="WARNING")
        counts = [plugin.kept_of_sample(x) for x in out["samples"]["vlprune_scenes"]]
        assert len(counts) == 4 and all(len(c) == 1 and c[0] in kept for c in counts), counts
        lm.vlprune_handle.remove()


def test_the_demo_shows_where_dyvte_dropped_the_image_tokenflex_cells_and_atp_counts():
    from vlprune.eval import demo

    path, question, expected = demo.sample_examples()[0]
    engine = demo.Engine.embedded("cpu", repeats=1)
    status, table, gallery, result = demo.handle_request(engine, path, question, ["dyvte", "tokenflex", "atp"],
                                                         "keep", 0.75, 25, expected)
    assert status.startswith("Done: 3 method(s) at keep=25"), status
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["tokenflex"]["visual_after"] == 25 and runs["tokenflex"]["visual_from_layer"] is None
    assert len(runs["tokenflex"]["merged"][0]) > 0  # its cells are drawn as merged regions
    per_layer = runs["atp"]["visual_per_layer"]  # its count from each module's layer on, in the table too
    assert list(per_layer) == ["1", "2", "3"] and per_layer["3"] == runs["atp"]["visual_after"]
    assert "256 → " + " → ".join(f"{c} (LM layer {k})" for k, c in per_layer.items()) in table
    exit_layer = runs["dyvte"]["visual_from_layer"]
    if exit_layer is not None:  # the image left inside the LM: the table says from which layer
        assert f"256 → 0 from LM layer {exit_layer}" in table
    else:
        assert runs["dyvte"]["visual_after"] == 256


def test_bench_times_learned_methods_on_the_embedded_model_and_skips_them_elsewhere(tmp_path):
    from vlprune.eval import bench, geometries

    if geometries.embedded_unavailable():
        pytest.skip(geometries.embedded_unavailable())
    assert bench.main(["--geometry", "embedded", "--methods", "atp,dyvte,tokenflex", "--keeps", "25", "--repeats", "1",
                       "--new-tokens", "2", "--output", str(tmp_path / "e")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "e" / "bench.json").read_text())}
    assert rows["tokenflex"]["kept"] == 25 and "dyvte" in rows and "atp" in rows
    assert bench.main(["--quick", "--lm-width", "256", "--methods", "pool,atp,dyvte,tokenflex", "--tiny-vision",
                       "--output", str(tmp_path / "q")]) == 0
    rows = {r["method"] for r in json.loads((tmp_path / "q" / "bench.json").read_text())}
    md = (tmp_path / "q" / "bench.md").read_text()
    assert "pool" in rows and not {"atp", "dyvte", "tokenflex"} & rows
    assert "`tokenflex` skipped: its weights do not fit this model (pass --weights tokenflex=DIR" in md
    with pytest.raises(SystemExit):
        bench.parse(["--weights", "pool=x"])
