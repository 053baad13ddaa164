"""Analytic FLOPs of a LLaVA-style prefill, from the sequence length each layer actually saw.

How it counts (the same rules for every method, so ratios are fair):
- a multiply-accumulate is 2 FLOPs; only matrix products are counted (norms, activations, softmax,
  rotary and residual adds are left out: under 1% at these widths);
- vision layer over n tokens (width d, MLP width i): q, k, v, o projections 4·n·d², scores and
  weighted values 2·n²·d, MLP 2·n·d·i (multiply-accumulates);
- decoder layer over n new tokens after ``past`` cached ones (width d, key/value width d_kv, MLP
  width i, gated MLP): q and o 2·n·d², k and v 2·n·d·d_kv, causal scores and weighted values
  2·d·n·(past + (n+1)/2) (each query attends to the keys up to itself), MLP 3·n·d·i;
- projector: two linear layers over the tokens it sees; LM head: the positions whose logits are kept.
Lengths come from hooks on every layer during the measured run, so in-encoder (FlowCut) and in-LLM
(FastV) pruning are counted at the lengths those layers really processed.
open_clip image towers (``open_clip_vit_flops``): the same vision-layer rule per block, plus the patch
embedding (a p x p convolution: 3·p²·d per patch) and the output projection (d·output_dim per image).
"""
from __future__ import annotations


def vision_layer_macs(n: int, d: int, i: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * i


def decoder_layer_macs(n: int, d: int, d_kv: int, i: int, past: int = 0) -> float:
    return 2 * n * d * d + 2 * n * d * d_kv + 2 * d * n * (past + (n + 1) / 2) + 3 * n * d * i


def projector_macs(n: int, d_in: int, d_out: int) -> int:
    return n * d_in * d_out + n * d_out * d_out


class LengthRecorder:
    """Forward hooks on the vision and decoder layers that log the token count each one processed.

    Post-hooks see the arguments the layer really ran on (after every pre-hook, pruning ones included),
    whatever order the hooks were registered in."""

    def __init__(self, vision_layers, decoder_layers=(), projector=None):
        self.vision, self.decoder, self.projector = [], [], []
        self._hooks = [layer.register_forward_hook(self._log(self.vision), with_kwargs=True)
                       for layer in vision_layers]
        self._hooks += [layer.register_forward_hook(self._log(self.decoder), with_kwargs=True)
                        for layer in decoder_layers]
        if projector is not None:  # an image tower alone (open_clip) has none
            self._hooks.append(projector.register_forward_hook(self._log(self.projector), with_kwargs=True))

    @staticmethod
    def _log(store):
        def hook(_module, args, kwargs, _output):
            x = args[0] if args else kwargs["hidden_states"]
            store.append((x.shape[0], x.shape[1]))  # (batch, tokens) of this call

        return hook

    def clear(self):
        self.vision.clear(), self.decoder.clear(), self.projector.clear()

    def close(self):
        for h in self._hooks:
            h.remove()


def llava_prefill_flops(config, rec: LengthRecorder, logits_kept: int = 1) -> dict:
    """FLOPs of one prefill of a LlavaConfig model, per part, from the recorded (batch, tokens) calls."""
    v, t = config.vision_config, config.text_config
    d_kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    vision = sum(2 * b * vision_layer_macs(n, v.hidden_size, v.intermediate_size) for b, n in rec.vision)
    decoder = sum(2 * b * decoder_layer_macs(n, t.hidden_size, d_kv, t.intermediate_size) for b, n in rec.decoder)
    projector = sum(2 * b * projector_macs(n, v.hidden_size, t.hidden_size) for b, n in rec.projector)
    batch = rec.decoder[0][0] if rec.decoder else 0
    head = 2 * batch * logits_kept * t.hidden_size * t.vocab_size
    return {"vision": vision, "projector": projector, "llm": decoder + head,
            "total": vision + projector + decoder + head}


# -- Qwen2.5-VL -----------------------------------------------------------------------------------------
# Its tower differs from a CLIP tower in three ways the count follows:
# - a block's attention runs per segment - the whole image in full-attention blocks, a 112 px window in
#   the others - so scores and weighted values cost 2·d·Σ(segment²), read from the ``cu_seqlens`` each
#   block really received (FlowCut's shrunken windows included), not 2·n²·d;
# - the MLP is gated (gate, up, down): 3·S·d·i; q/k/v (one fused projection) and the output projection
#   are 4·S·d² as in CLIP;
# - the PatchMerger maps each 2x2 unit (4·d wide) through two linear layers: m·(4d)² + m·4d·d_out over
#   the m merged tokens it emits.
# The patch embedding (a linear on the raw pixels, as CLIP's patch conv, which the LLaVA count also
# leaves out) is not counted; it is the same for every setting and under 0.3% of the 7B tower.
def qwen_block_macs(tokens: int, segments: list[int], d: int, i: int) -> int:
    return 4 * tokens * d * d + 2 * d * sum(s * s for s in segments) + 3 * tokens * d * i


def qwen_merger_macs(merged: int, d: int, unit: int, d_out: int) -> int:
    return merged * (unit * d) ** 2 + merged * unit * d * d_out


class QwenLengthRecorder:
    """Hooks on the Qwen2.5-VL vision blocks (tokens and attention segments per call), the merger and the
    decoder layers ((batch, tokens) per call); the vision sequence is flat over all images."""

    def __init__(self, blocks, decoder_layers, merger):
        self.vision, self.decoder, self.merger = [], [], []
        self._hooks = [b.register_forward_hook(self._block, with_kwargs=True) for b in blocks]
        self._hooks += [layer.register_forward_hook(LengthRecorder._log(self.decoder), with_kwargs=True)
                        for layer in decoder_layers]
        self._hooks.append(merger.register_forward_hook(self._merged, with_kwargs=True))

    def _block(self, _module, args, kwargs, _output):
        x = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        edges = [int(e) for e in cu.tolist()]
        self.vision.append((x.shape[0], [b - a for a, b in zip(edges[:-1], edges[1:])]))

    def _merged(self, module, args, kwargs, _output):
        # from the input: a pruning patcher's own hook may already have padded the output back out
        x = args[0] if args else kwargs["x"]
        self.merger.append(x.numel() // module.hidden_size)  # it views (S, d) as (S / 4, 4d)

    def close(self):
        for h in self._hooks:
            h.remove()


def qwen2_5_vl_prefill_flops(config, rec: QwenLengthRecorder, logits_kept: int = 1) -> dict:
    """FLOPs of one prefill of a Qwen2_5_VLConfig model, per part, from the recorded calls."""
    v, t = config.vision_config, config.text_config
    unit = v.spatial_merge_size ** 2
    d_kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    vision = sum(2 * qwen_block_macs(n, segs, v.hidden_size, v.intermediate_size) for n, segs in rec.vision)
    merger = sum(2 * qwen_merger_macs(m, v.hidden_size, unit, v.out_hidden_size) for m in rec.merger)
    decoder = sum(2 * b * decoder_layer_macs(n, t.hidden_size, d_kv, t.intermediate_size) for b, n in rec.decoder)
    batch = rec.decoder[0][0] if rec.decoder else 0
    head = 2 * batch * logits_kept * t.hidden_size * t.vocab_size
    return {"vision": vision, "projector": merger, "llm": decoder + head,
            "total": vision + merger + decoder + head}


def open_clip_vit_flops(visual, rec: LengthRecorder, signal_macs: int = 0) -> dict:
    """FLOPs of the open_clip ``VisionTransformer`` forwards a ``LengthRecorder`` over
    ``visual.transformer.resblocks`` saw, per part; ``signal_macs``: what a patch spent on its signals
    (``handle._patcher.signal_macs``), reported apart and included in the total."""
    d = visual.transformer.width
    mlp = visual.transformer.resblocks[0].mlp.c_fc.out_features
    (gh, gw), (ph, pw) = visual.grid_size, visual.patch_size
    # every forward logs each block once, in order: the first block's entries count the images
    images = sum(b for b, _ in rec.vision[::len(visual.transformer.resblocks)])
    embed = 2 * images * gh * gw * 3 * ph * pw * d
    blocks = sum(2 * b * vision_layer_macs(n, d, mlp) for b, n in rec.vision)
    head = 0 if visual.proj is None else 2 * images * visual.proj.shape[0] * visual.proj.shape[1]
    signals = 2 * signal_macs
    return {"embed": embed, "blocks": blocks, "head": head, "signals": signals,
            "total": embed + blocks + head + signals}
