"""Write the demo's sample images (assets/samples/): a few held-out synthetic scenes of the embedded model's
generator, one per question type, as small JPEGs, with their questions and answers in samples.json.

Run from the repository root: ``.venv/bin/python scripts/demo_samples.py``. Deterministic: the scenes are
seeded (vlprune.embedded.scenes), so rerunning rewrites the same pictures.
"""
import json
from pathlib import Path

from vlprune.embedded import scenes

OUT = Path(__file__).resolve().parent.parent / "assets" / "samples"
PICK = (0, 1, 3, 4)  # test-split items: a color, a count, a where and a shape question
QUALITY = 90  # ~18 KB per 224 px scene; the embedded model answers these the same as the PNG originals


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    for item in scenes.test_items(max(PICK) + 1):
        if item["index"] not in PICK:
            continue
        name = f"scene-{item['index']:03d}-{item['qtype']}.jpg"
        item["image"].save(OUT / name, "JPEG", quality=QUALITY)
        index.append({"file": name, "question": item["question"], "answer": item["answer"]})
    (OUT / "samples.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {len(index)} samples to {OUT}")


if __name__ == "__main__":
    main()
