"""Functions of the offline lmms-eval task ``vlprune_scenes`` (``eval/tasks/vlprune_scenes``).

The task's data file ``items.jsonl`` lists the pinned held-out split of the embedded model's synthetic
scenes (``vlprune.embedded.scenes.test_items``: index, scene, question type, question, answer); the
picture of test-seed scene ``scene`` is drawn again when lmms-eval asks for it, so no image is shipped and the
pixels are exactly those the split defines. Scoring is exact match of the greedy answer, overall and per
question type (``acc_color`` ... ``acc_shape``), as ``vlprune.embedded.evaluate`` scores.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from vlprune.embedded import scenes

TASK_DIR = Path(__file__).resolve().parent / "tasks"
ITEMS = TASK_DIR / "vlprune_scenes" / "items.jsonl"


def task_dir() -> str:
    """The folder to give lmms-eval as ``--include_path`` so that it finds ``vlprune_scenes``."""
    return str(TASK_DIR)


@lru_cache(maxsize=2048)
def scene(index: int):
    return scenes.make_scene(scenes.SEEDS["test"], int(index))


def doc_to_visual(doc):
    return [scene(doc["scene"]).pil()]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    pred = (results[0] or "").strip().lower()
    score = float(pred == doc["answer"])
    out = {"accuracy": score}
    out.update({f"acc_{qt}": (score if doc["qtype"] == qt else None) for qt in scenes.QTYPES})
    return out


def mean_present(values):
    """Mean over the items a per-type metric applies to (the others report None)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


def write_items(path: Path = ITEMS, n: int = scenes.TEST_SIZE) -> None:
    """Regenerate ``items.jsonl`` from the pinned split (``python -m vlprune.eval.scenes_task``)."""
    with open(path, "w") as f:
        for it in scenes.test_items(n):
            f.write(json.dumps({"index": it["index"], "scene": it["scene"], "qtype": it["qtype"],
                                "question": it["question"], "answer": it["answer"]}) + "\n")


if __name__ == "__main__":
    write_items()
