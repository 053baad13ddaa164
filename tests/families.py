"""One small adapter per model family, so the contract suite (test_contract.py) runs on every patcher.

A family knows its tiny model and how to call it: two single-image prompts of different lengths
(``single(i)``) and the two as one left-padded batch (``pair()``), one prompt with two images
(``double()``), ``forward`` and ``generate`` (returning only the new ids, after checking the family's
own generate contract), the module whose pre-hook sees the LM input, and the unpruned LM length. A new
patcher joins the contract by adding a Family subclass and a fixture in test_contract.py.
"""
from __future__ import annotations

import torch

import tiny


class Family:
    patcher = ""  # module name in vlprune.patches (what its patcher serves picks the methods)
    ragged_llm = True  # stage-"llm" batches whose rows keep different counts are evened out (else: an error)
    steps = 4  # new tokens per generate

    def __init__(self, model):
        self.model = model

    def options(self, method: str) -> dict:
        """Method options the tiny model needs (e.g. a layer index its small tower has, learned weights)."""
        return tiny.learned_options(self.model, method)

    def forward(self, inp, **kw):
        with torch.inference_mode():
            return self.model(**inp, **kw)

    def generate(self, inp, **kw):
        """New ids only (B, T); asserts that the output keeps the unpatched contract (prompt ids first)."""
        kw.setdefault("max_new_tokens", self.steps)
        with torch.inference_mode():
            out = self.model.generate(**inp, do_sample=False, **kw)
        ids = inp["input_ids"]
        assert torch.equal(out[:, : ids.shape[1]], ids), "generate must return the prompt ids first"
        return out[:, ids.shape[1]:]

    def reference_generate(self, inp):
        return self.generate(inp)

    def lm(self):
        return self.model.model.language_model

    def layers(self):
        return self.lm().layers

    def lm_length(self, inp) -> int:
        return inp["input_ids"].shape[1]

    def dropped(self, record) -> int:
        """LM positions an image lost."""
        return record.before - record.after


class LlavaHF(Family):
    patcher = "llava_hf"
    ragged_llm = False
    TEXTS = ((1, 7, 8, 9, 10, 11), (1,))

    def single(self, i):
        ids, mask = tiny.batch([tiny.prompt(text_before=self.TEXTS[i])])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": tiny.pixels(2)[i:i + 1]}

    def pair(self):
        ids, mask = tiny.batch([tiny.prompt(text_before=t) for t in self.TEXTS])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": tiny.pixels(2)}

    def double(self):
        ids, mask = tiny.batch([tiny.prompt(n_images=2)])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": tiny.pixels(2, seed=3)}


class LlavaNext(Family):
    patcher = "llava_next_hf"

    def single(self, i):
        return self._parts()[i]

    def pair(self):
        from test_llava_next_hf import _concat

        return _concat(self._parts())

    def _parts(self):
        from test_llava_next_hf import inputs

        texts = ["w1 w7 w8 w9 <image> w3", "w1 <image> w3"]  # different lengths: left padding
        return [inputs([name], [text], seed=i) for i, (name, text) in enumerate(zip(("wide", "big"), texts))]

    def double(self):
        from test_llava_next_hf import inputs

        return inputs([("wide", "tall")])

    def dropped(self, record) -> int:  # a high-res row that keeps nothing loses its newline too
        return record.before - record.after + record.grids[1][0] - record.newlines


class Qwen(Family):
    patcher = "qwen2_5_vl"

    def options(self, method):
        from test_qwen2_5_vl import OPTIONS

        return {**OPTIONS.get(method, {}), **tiny.learned_options(self.model, method)}

    def single(self, i):
        from test_qwen2_5_vl import TWO_SIZES, inputs

        return inputs(TWO_SIZES[i])

    def pair(self):
        from test_qwen2_5_vl import TWO_SIZES, inputs

        return inputs(*TWO_SIZES)

    def double(self):
        from test_qwen2_5_vl import SQUARE, WIDE, inputs

        return inputs(("left right", [SQUARE, WIDE], "up ?"))


class LlavaOriginal(Family):
    """The original ``llava`` code: one -200 placeholder per image; ``generate`` returns only new ids."""

    patcher = "llava_original"
    ragged_llm = False
    TEXTS = LlavaHF.TEXTS

    def _inputs(self, prompts, images):
        import tiny_original as to

        ids, mask = tiny.batch([to.prompt(**p) for p in prompts])
        return {"input_ids": ids, "attention_mask": mask, "images": images}

    def single(self, i):
        return self._inputs([{"text_before": self.TEXTS[i]}], tiny.pixels(2)[i:i + 1])

    def pair(self):
        return self._inputs([{"text_before": t} for t in self.TEXTS], tiny.pixels(2))

    def double(self):
        return self._inputs([{"n_images": 2}], tiny.pixels(2, seed=3))

    def generate(self, inp, **kw):
        kw.setdefault("max_new_tokens", self.steps)
        with torch.inference_mode():
            out = self.model.generate(inp["input_ids"], images=inp["images"], attention_mask=inp["attention_mask"],
                                      do_sample=False, **kw)
        assert out.shape[1] <= kw["max_new_tokens"], "the original generate returns only the new ids"
        return out

    def reference_generate(self, inp):
        import tiny_original as to

        return to.greedy(self.model, inp["input_ids"], inp["attention_mask"], inp["images"], self.steps)

    def lm(self):
        return self.model.model  # LlavaLlamaModel: the Llama decoder, fed inputs_embeds

    def lm_length(self, inp) -> int:
        import tiny_original as to

        ids, mask = inp["input_ids"], inp["attention_mask"].bool()
        rows = mask.sum(1) + (ids == to.IMAGE_INDEX).sum(1) * (to.N - 1)
        return int(rows.max())
