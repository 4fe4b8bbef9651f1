"""How each Hugging Face causal LM turns `lm_head(hidden)` into its logits: the one table.

Most models use the plain projection `logits = hidden @ W.T (+ b)`. A few post-process it in their
`*ForCausalLM.forward`, after the `lm_head` and outside the backbone; those steps are what the
fused losses must reproduce. Each is read from a config attribute:

    softcap:        logits = c·tanh(logits / c)          (Gemma 2/3, VaultGemma, nanochat, xLSTM)
    scale:          logits = logits · s                  (Cohere's `logit_scale`, Falcon-H1, HyperCLOVA X)
    inverse_scale:  logits = logits / s                  (Granite's `logits_scaling`; Inkling divides the
                                                          hidden states, the same for a bias-free head)
    vocab:          logits = logits[..., :n]             (Inkling's `unpadded_vocab_size`)

A model whose post-processing the fused ops cannot express is marked `unsupported`, with the reason.

Everything that happens *before* the `lm_head` (Gemma's √H embedding scale, final norms) is the
backbone's business and needs no entry. Entries were read from the modeling files of
transformers 5.24 (`*ForCausalLM.forward`, the lines after `self.lm_head(hidden_states)`), and checked by a
sweep of every causal LM of transformers 5.25 built from a tiny config against its own loss and gradients.
Types whose loss is not "shift the labels, cross-entropy of the head's logits" are refused too: the
seq2seq decoders (unshifted labels), the masked-LM families' prediction heads, ProphetNet.

A `model_type` absent from the table is plain, unless its (text) config sets one of the known
attribute names below, in which case that rule is applied with a one-time warning: better a loud
guess from the config than a silently different loss.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class HeadQuirk:
    """Names of the config attributes (on the text config) that post-process the logits."""

    softcap: str | None = None
    scale: str | None = None
    inverse_scale: str | None = None
    vocab: str | None = None        # the first n rows of the head are the vocabulary
    unsupported: str | None = None  # why the fused ops cannot reproduce this model's logits


PLAIN = HeadQuirk()
_GEMMA_SOFTCAP = HeadQuirk(softcap="final_logit_softcapping")
_COHERE_SCALE = HeadQuirk(scale="logit_scale")
_GRANITE_SCALE = HeadQuirk(inverse_scale="logits_scaling")

# model_type -> quirk. Plain architectures are listed too, so that the table says they were checked.
QUIRKS: dict[str, HeadQuirk] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                     "phi", "phi3", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "falcon", "bloom", "opt",
                     "olmo", "olmo2", "stablelm", "starcoder2",
                     "mpt"), PLAIN),  # MPT's config has a `logit_scale` its forward never applies
    # Gemma 3's multimodal `Gemma3ForConditionalGeneration` applies no softcap in its forward.
    "gemma3": PLAIN,
    **dict.fromkeys(("gemma2", "gemma3_text", "vaultgemma", "nanochat", "inkling2_text", "inkling2",
                     "inkling2_loop_text", "inkling2_loop"), _GEMMA_SOFTCAP),
    "xlstm": HeadQuirk(softcap="output_logit_soft_cap"),
    "recurrent_gemma": HeadQuirk(softcap="logits_soft_cap"),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), _COHERE_SCALE),
    "falcon_h1": HeadQuirk(scale="lm_head_multiplier"),
    # HyperCLOVA X multiplies by `logits_scaling`, the attribute Granite divides by
    **dict.fromkeys(("hyperclovax", "hyperclovax_vision_v2"), HeadQuirk(scale="logits_scaling")),
    **dict.fromkeys(("inkling_text", "inkling_mm_model"),
                    HeadQuirk(inverse_scale="logits_mup_width_multiplier", vocab="unpadded_vocab_size")),
    "chameleon": HeadQuirk(unsupported="it sets the image tokens' logits to the dtype's minimum before its loss"),
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                     "granitemoehybrid"), _GRANITE_SCALE),
    # (from a sweep of every causal LM of transformers 5.25 against its own loss)
    **dict.fromkeys(("beam", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
                     "gemma4_unified_text"), _GEMMA_SOFTCAP),
    "minicpm3": _GRANITE_SCALE,  # divides the hidden states by its `logits_scaling` property (bias-free head)
    **dict.fromkeys(("bart", "mvp", "trocr", "blenderbot", "blenderbot-small", "bigbird_pegasus", "marian", "mbart",
                     "pegasus", "plbart", "whisper", "cpmant", "xlnet", "xlm"), HeadQuirk(
        unsupported="its loss does not shift the labels (labels[t] is the target of logits[t], the seq2seq "
                    "decoders' convention), where the causal-LM loss shifts them")),
    **dict.fromkeys(("bert", "ernie", "big_bird", "megatron-bert", "roc_bert", "roformer", "roberta", "data2vec-text",
                     "roberta-prelayernorm", "camembert", "xlm-roberta", "xlm-roberta-xl", "xmod",
                     "modernbert-decoder", "electra", "rembert"), HeadQuirk(
        unsupported="its logits come from a prediction head (dense, activation, LayerNorm) before the output "
                    "embeddings, which the fused ops do not apply")),
    "prophetnet": HeadQuirk(unsupported="its logits come from n-gram predicting streams, its loss is a smoothed "
                                        "n-gram NLL"),
}

# For architectures outside the table: attribute name -> which rule it means.
_KNOWN_KEYS = {
    "final_logit_softcapping": "softcap",
    "logits_soft_cap": "softcap",
    "output_logit_soft_cap": "softcap",
    "logit_scale": "scale",
    "output_multiplier": "scale",
    "lm_head_multiplier": "scale",
    "logits_scaling": "inverse_scale",
}
_warned: set[str] = set()


def head_quirk(config) -> HeadQuirk:
    """The quirk of `config.model_type`; for an unknown type, guessed from its config attributes."""
    model_type = getattr(config, "model_type", None)
    if model_type in QUIRKS:
        return QUIRKS[model_type]
    text = _text_config(config)
    found = {rule: key for key, rule in _KNOWN_KEYS.items() if getattr(text, key, None) is not None}
    if not found:
        return PLAIN
    if model_type not in _warned:
        _warned.add(model_type)
        warnings.warn(f"alignfast: model_type {model_type!r} is not in alignfast's quirks table; applying "
                      f"{found} from its config to the logits. Check the loss against the model's own "
                      f"(alignfast.integrations.model_quirks.QUIRKS).", stacklevel=3)
    return HeadQuirk(**found)


def head_constants(config) -> tuple[float | None, float, int | None]:
    """(softcap, scale, vocab) of `config`'s model: logits = softcap·tanh(scale·(h·W + b) / softcap) over
    the first `vocab` rows of the head (None: all of them)."""
    quirk, text = head_quirk(config), _text_config(config)
    if quirk.unsupported:
        raise NotImplementedError(f"alignfast cannot fuse the head of model_type "
                                  f"{getattr(config, 'model_type', None)!r}: {quirk.unsupported}")
    softcap = _read(text, quirk.softcap)
    scale = 1.0
    if quirk.scale is not None and _read(text, quirk.scale) is not None:
        scale *= _read(text, quirk.scale)
    if quirk.inverse_scale is not None and _read(text, quirk.inverse_scale) is not None:
        scale /= _read(text, quirk.inverse_scale)
    vocab = _read(text, quirk.vocab)
    return softcap, scale, None if vocab is None else int(vocab)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _read(config, key: str | None) -> float | None:
    if key is None:
        return None
    value = getattr(config, key, None)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NotImplementedError(f"config.{key}={value!r} is not a number; alignfast cannot apply it to the "
                                  f"logits") from None
