"""Precompute the frozen tower's features for training (``python -m vlprune.embedded.features``).

Stores, per scene of a split: the patch features the LLaVA projector sees (``hidden_states[-2]`` of the
Dinov2 tower without [CLS], 256 x 384, float16), per-patch labels for the auxiliary loss (object colour,
object shape, background = 0) and the scene's question/answer pairs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import dinov2, scenes

GRID = dinov2.GRID


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (224, 224, 3) scenes -> normalised (B, 3, 224, 224), as the processor does."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(dinov2.IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dinov2.IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def patch_labels(scene) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (16 x 16, raster): colour index + 1 and shape index + 1 of the object covering at least
    a quarter of the patch, 0 for background."""
    col = np.zeros(GRID * GRID, np.int64)
    shp = np.zeros(GRID * GRID, np.int64)
    names = list(scenes.COLORS)
    for obj, mask in zip(scene.objects, scene.masks):
        cover = mask.reshape(GRID, scenes.PATCH, GRID, scenes.PATCH).mean(axis=(1, 3)).reshape(-1)
        on = cover >= 0.25
        col[on] = names.index(obj.color) + 1
        shp[on] = scenes.SHAPES.index(obj.shape) + 1
    return col, shp


def _scene_chunk(job):
    split, start, stop = job
    images, cols, shps, records = [], [], [], []
    for i in range(start, stop):
        s = scenes.train_scene(i) if split == "train" else scenes.make_scene(scenes.SEEDS[split], i)
        images.append(s.image)
        c, h = patch_labels(s)
        cols.append(c)
        shps.append(h)
        records.append({"qas": [[q.qtype, q.question, q.answer] for q in s.qas],
                        "objects": [[o.color, o.shape, o.where] for o in s.objects]})
    return np.stack(images), np.stack(cols), np.stack(shps), records


@torch.inference_mode()
def compute(split: str, n: int, device="cpu", dtype=torch.bfloat16, workers: int = 1, batch: int = 32,
            weights=None, log=print, pool=None):
    """Features (n, 256, 384) float16 on ``device``, colour and shape labels (n, 256), records.
    ``pool``: a multiprocessing pool to draw scenes in (fork it before CUDA is initialised)."""
    tower = dinov2.load_dinov2(weights=weights).to(device=device, dtype=dtype)
    feats = torch.empty((n, GRID * GRID, 384), dtype=torch.float16, device=device)
    cols, shps, records = [], [], []
    jobs = [(split, a, min(n, a + batch)) for a in range(0, n, batch)]
    t0 = time.time()
    own = pool is None and workers > 1
    if own:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers)
    chunks = map(_scene_chunk, jobs) if pool is None else pool.imap(_scene_chunk, jobs)
    try:
        for j, (images, c, h, recs) in enumerate(chunks):
            a = jobs[j][1]
            x = pixels(list(images)).to(device=device, dtype=dtype)
            hidden = tower(x, output_hidden_states=True).hidden_states[-2]
            feats[a:a + len(images)] = hidden[:, 1:].to(torch.float16)
            cols.append(c)
            shps.append(h)
            records += recs
            if j % 50 == 0:
                log(f"{split}: {a + len(images)}/{n} scenes, {time.time() - t0:.0f} s")
    finally:
        if own:
            pool.close()
    log(f"{split}: {n} scenes in {time.time() - t0:.0f} s")
    return feats, np.concatenate(cols), np.concatenate(shps), records


def extract(split: str, n: int, out: Path, workers: int = 1, log=print):
    out.mkdir(parents=True, exist_ok=True)
    feats, cols, shps, records = compute(split, n, workers=workers, log=log)
    np.save(out / f"{split}_feats.npy", feats.numpy())
    np.save(out / f"{split}_colors.npy", cols)
    np.save(out / f"{split}_shapes.npy", shps)
    (out / f"{split}_qas.json").write_text(json.dumps(records))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vlprune_embedded"))
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--val", type=int, default=400)
    ap.add_argument("--workers", type=int, default=1, help="processes drawing scenes")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    extract("val", args.val, args.out, args.workers, log=lambda m: print(m, flush=True))
    extract("train", args.train, args.out, args.workers, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
