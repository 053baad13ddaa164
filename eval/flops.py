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

    def __init__(self, vision_layers, decoder_layers, projector):
        self.vision, self.decoder, self.projector = [], [], []
        self._hooks = [layer.register_forward_hook(self._log(self.vision), with_kwargs=True)
                       for layer in vision_layers]
        self._hooks += [layer.register_forward_hook(self._log(self.decoder), with_kwargs=True)
                        for layer in decoder_layers]
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
