"""Write the demo's sample scenes (assets/samples/): a few test-seed scenes of the embedded model's generator,
one per question type, as small JPEGs, with their questions and answers in samples.json. Entries that are
not scenes (the photographs) are kept as they are.

Run from the repository root: ``.venv/bin/python scripts/demo_samples.py``. Deterministic: the scenes are
seeded (vlprune.embedded.scenes), so rerunning rewrites the same pictures.
"""
import json
from pathlib import Path

from vlprune.embedded import scenes

OUT = Path(__file__).resolve().parent.parent / "assets" / "samples"
PICK = ((0, "color"), (1, "count"), (3, "where"), (4, "shape"))  # (test-seed scene, question type asked)
QUALITY = 90  # ~18 KB per 224 px scene; the embedded model answers these the same as the PNG originals


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    for number, qtype in PICK:
        scene = scenes.make_scene(scenes.SEEDS["test"], number)
        qa = next(q for q in scene.qas if q.qtype == qtype)
        name = f"scene-{number:03d}-{qtype}.jpg"
        scene.pil().save(OUT / name, "JPEG", quality=QUALITY)
        index.append({"file": name, "question": qa.question, "answer": qa.answer})
    listing = OUT / "samples.json"
    kept = [e for e in json.loads(listing.read_text()) if not e["file"].startswith("scene-")] if listing.exists() else []
    listing.write_text(json.dumps(index + kept, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(index)} scenes to {OUT} (kept {len(kept)} other samples)")


if __name__ == "__main__":
    main()
