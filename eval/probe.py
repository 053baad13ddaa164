"""What ``vlprune-eval`` measures inside one cell besides accuracy: the prefill time of a real evaluation
input and the visual tokens kept, and whether ``generate`` raised (``Probe``)."""
from __future__ import annotations

import statistics
import time


class Probe:
    """Watches the HF model during one cell: keeps the tensor inputs of its first ``generate`` (or
    pixel-carrying forward) call, to time the prefill on a real evaluation input afterwards, and records
    exceptions raised by ``generate`` (some lmms-eval models log them and answer "", which would
    otherwise turn a broken patch into a silent accuracy of zero)."""

    def __init__(self, model):
        import torch

        self.model, self.inputs, self.errors, self.calls = model, None, [], 0
        self._had = "generate" in model.__dict__
        self._old = model.__dict__.get("generate")
        original = model.generate

        def generate(*args, **kwargs):
            self.calls += 1
            self._keep(kwargs)
            try:
                return original(*args, **kwargs)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                raise

        model.generate = generate
        self._hook = model.register_forward_pre_hook(lambda _m, _a, kw: self._keep(kw), with_kwargs=True)
        self._torch = torch

    def _keep(self, kwargs):
        if self.inputs is None and kwargs.get("pixel_values") is not None:
            inputs = {k: v for k, v in kwargs.items() if isinstance(v, self._torch.Tensor)}
            rows = inputs["input_ids"].shape[0] if "input_ids" in inputs else 0
            if rows > 1 and all(v.shape[0] == rows for v in inputs.values()):
                inputs = {k: v[:1] for k, v in inputs.items()}  # one prompt: comparable across batch sizes
            self.inputs = inputs

    def remove(self):
        self._hook.remove()
        if self._had:
            self.model.generate = self._old
        else:
            self.model.__dict__.pop("generate", None)

    def prefill(self, handle, repeats: int = 3) -> tuple[float | None, float | None]:
        """(median prefill ms of one forward pass on the captured input, visual tokens kept per image)."""
        if self.inputs is None:
            return None, None
        torch = self._torch
        times = []
        with torch.inference_mode():
            for i in range(repeats + 1):
                if any(t.is_cuda for t in self.inputs.values()):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                self.model(**self.inputs)
                if any(t_.is_cuda for t_ in self.inputs.values()):
                    torch.cuda.synchronize()
                if i:  # the first is a warm-up
                    times.append((time.perf_counter() - t) * 1000)
        if handle is not None and handle.last:
            kept = statistics.mean(r.after for r in handle.last)
        else:
            image_token = getattr(self.model.config, "image_token_id", None) or getattr(
                self.model.config, "image_token_index", None)
            ids, pix = self.inputs.get("input_ids"), self.inputs.get("pixel_values")
            kept = None
            if image_token is not None and ids is not None:
                images = len(self.inputs["image_grid_thw"]) if "image_grid_thw" in self.inputs else pix.shape[0]
                kept = float((ids == image_token).sum()) / max(images, 1)
        return round(statistics.median(times), 2), kept
