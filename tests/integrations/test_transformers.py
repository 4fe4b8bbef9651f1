"""alignfast.integrations.transformers on tiny random-init models of each architecture (no downloads).

The oracle is the model's own forward: its logits-based loss and the gradients of every parameter
(lm_head and tied embeddings included) must come out the same from the fused path.
"""
import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from alignfast.integrations import transformers as ait  # noqa: E402
from helpers import assert_close  # noqa: E402

V, H, B, T = 128, 32, 3, 9
RTOL = 1e-5

_COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
               intermediate_size=64,
               initializer_range=0.2)  # logits of order 1, so softcaps and scales visibly matter
# name -> (config class, model class, config overrides)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=0.7)),
    "gemma3-softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       dict(head_dim=16, final_logit_softcapping=0.7)),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=H, n_layer=1, n_head=2, n_positions=64,
                                                   vocab_size=V, initializer_range=0.2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "cohere-scale": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=1.7, eos_token_id=2)),
    "granite-scale": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.6)),
    # its `base_model_prefix` names a `language_model` the causal LM class does not have: the backbone is `model`
    "llama4-text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(head_dim=16, intermediate_size_mlp=64,
                                                                  num_local_experts=4, num_experts_per_tok=1)),
    "mixtral-router": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                                   output_router_logits=True)),
    "falcon_h1-multiplier": ("FalconH1Config", "FalconH1ForCausalLM",
                             dict(lm_head_multiplier=2.5, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                  mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4)),
    "hyperclovax-scale": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=2.5)),
    # divides the hidden states by logits_mup_width_multiplier, keeps the first unpadded_vocab_size logits
    "inkling-unpadded": ("InklingTextConfig", "InklingForCausalLM",
                         dict(head_dim=8, num_attention_heads=4, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                              swa_head_dim=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                              n_shared_experts=1, mlp_layer_types=["dense"], logits_mup_width_multiplier=3.0,
                              unpadded_vocab_size=V - 11)),
}
LABEL_VOCAB = {"inkling-unpadded": V - 11}  # targets must lie in the vocabulary the model keeps


@functools.lru_cache(maxsize=None)
def _fresh(name):
    config_cls, model_cls, overrides = ARCHS[name]
    if not hasattr(transformers, config_cls) or not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    kwargs = dict(overrides) if config_cls == "GPT2Config" else {**_COMMON, **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).float().eval()  # eval: no dropout


def tiny(name):
    return copy.deepcopy(_fresh(name))


def batch(padded=True, seed=1, vocab=V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding
        mask[2, -2:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100  # a masked prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(fused, ref, name):
    (out, grads), (ref_out, ref_grads) = fused, ref
    assert out.logits is None and ref_out.logits is not None
    assert_close(out.loss, ref_out.loss, rtol=RTOL, name=f"{name} loss")
    assert grads.keys() == ref_grads.keys(), f"{name}: gradients of {sorted(grads.keys() ^ ref_grads.keys())}"
    for key in ref_grads:
        assert_close(grads[key], ref_grads[key], rtol=RTOL, name=f"{name} grad {key}")


@pytest.mark.parametrize("name", list(ARCHS))
def test_loss_and_grads_match_the_models_own(name):
    model, inputs = tiny(name), batch(vocab=LABEL_VOCAB.get(name, V))
    ref = loss_and_grads(model, **inputs)
    ait.apply(model)
    fused = loss_and_grads(model, **inputs)
    assert_same(fused, ref, name)
    assert len(fused[1]) == sum(p.requires_grad for p in model.parameters())  # every parameter got one
    if name.startswith("mixtral"):
        assert_close(fused[0].aux_loss, ref[0].aux_loss, rtol=RTOL, name="aux_loss")
    ait.revert(model)
    assert "forward" not in model.__dict__
    again = model(**inputs)
    assert again.logits is not None
    assert_close(again.loss, ref[0].loss, rtol=0, atol=0, name="after revert")


@pytest.mark.parametrize("name, softcap, scale", [
    ("gemma2-softcap", 0.7, 1.0), ("gemma3-softcap", 0.7, 1.0), ("cohere-scale", None, 1.7),
    ("granite-scale", None, 1 / 0.6), ("llama", None, 1.0), ("falcon_h1-multiplier", None, 2.5),
    ("hyperclovax-scale", None, 2.5), ("inkling-unpadded", None, 1 / 3.0)])
def test_output_head_reads_the_quirks_table(name, softcap, scale):
    head = ait.output_head(tiny(name))
    assert head.softcap == softcap and head.scale == pytest.approx(scale)
    assert head.weight.shape[0] == LABEL_VOCAB.get(name, V)


def test_heads_the_fused_ops_cannot_express_are_refused():
    """Chameleon masks its image tokens' logits; xLSTM's softcap and MPT's unused logit_scale are read
    from the table (the config alone would mislead: MPT never applies its logit_scale)."""
    from alignfast.integrations.model_quirks import head_constants

    with pytest.raises(NotImplementedError, match="image tokens"):
        head_constants(transformers.ChameleonConfig(vocab_size=V))
    assert head_constants(transformers.xLSTMConfig(output_logit_soft_cap=2.0)) == (2.0, 1.0, None)
    assert head_constants(transformers.MptConfig(logit_scale="inv_sqrt_d_model")) == (None, 1.0, None)


REFUSED = {  # model class, config class, config overrides, the reason's words
    "bart": ("BartForCausalLM", "BartConfig", dict(d_model=H, decoder_layers=1, encoder_layers=1,
                                                    decoder_attention_heads=2, encoder_attention_heads=2,
                                                    decoder_ffn_dim=64, encoder_ffn_dim=64), "does not shift"),
    "whisper": ("WhisperForCausalLM", "WhisperConfig", dict(d_model=H, decoder_layers=1, encoder_layers=1,
                                                             decoder_attention_heads=2, encoder_attention_heads=2,
                                                             decoder_ffn_dim=64, encoder_ffn_dim=64, pad_token_id=0,
                                                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                "does not shift"),
    "bert": ("BertLMHeadModel", "BertConfig", dict(num_attention_heads=2, is_decoder=True), "prediction head"),
    "roberta": ("RobertaForCausalLM", "RobertaConfig", dict(num_attention_heads=2, is_decoder=True),
                "prediction head"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_whose_loss_is_not_the_causal_lm_loss_are_refused(name):
    """From a sweep of every causal LM in transformers 5.25: these gave a silently different loss (unshifted
    labels; a transform before the output embeddings). Now apply refuses them, naming why."""
    model_cls, config_cls, overrides, reason = REFUSED[name]
    config = getattr(transformers, config_cls)(vocab_size=V, hidden_size=H, num_hidden_layers=1, intermediate_size=64,
                                               **overrides)
    model = getattr(transformers, model_cls)(config)
    with pytest.raises(NotImplementedError, match=reason):
        ait.apply(model)
    assert not ait.is_applied(model)


def test_an_unknown_type_with_a_nested_head_is_refused(monkeypatch):
    """Outside the table, the structure still tells: output embeddings nested in a head module sit behind a
    transform the fused ops would skip."""
    from alignfast.integrations import model_quirks

    monkeypatch.delitem(model_quirks.QUIRKS, "roberta")
    model_cls, config_cls, overrides, _ = REFUSED["roberta"]
    config = getattr(transformers, config_cls)(vocab_size=V, hidden_size=H, num_hidden_layers=1, intermediate_size=64,
                                               **overrides)
    with pytest.raises(NotImplementedError, match=r"`lm_head.decoder`, inside a prediction head with other layers \(dense, layer_norm\)"):
        ait.apply(getattr(transformers, model_cls)(config))


@pytest.mark.parametrize("cls", ["DogeConfig", "JetMoeConfig"])
def test_router_aux_losses_of_other_conventions(cls):
    """JetMoE's aux loss is Mixtral's under another coefficient name (supported); Doge's function takes
    other arguments (a clear NotImplementedError, not a TypeError from inside it)."""
    kw = dict(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              output_router_logits=True)
    if cls == "DogeConfig":
        kw.update(is_moe=True, num_experts=4, num_experts_per_tok=2, num_key_value_heads=2)
    else:
        kw.update(num_local_experts=4, num_experts_per_tok=2, kv_channels=16, num_key_value_heads=2)
    config = getattr(transformers, cls)(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    inputs = batch()
    try:
        ref = loss_and_grads(model, **inputs)
    except TypeError as e:  # transformers 5.17's own Doge MoE forward (a tuple into F.dropout)
        if cls != "DogeConfig":
            raise
        pytest.skip(f"transformers {transformers.__version__}'s own Doge forward fails: {e}")
    ait.apply(model)
    if cls == "DogeConfig":
        with pytest.raises(NotImplementedError, match="router aux loss"):
            model(**inputs)
    else:
        assert_same(loss_and_grads(model, **inputs), ref, cls)


@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "gemma2-softcap"])
def test_last_hidden_states_are_what_the_lm_head_sees(name):
    model, inputs = tiny(name), batch()
    head = ait.output_head(model)
    assert head.weight is model.get_output_embeddings().weight
    if model.config.tie_word_embeddings:
        assert head.weight is model.get_input_embeddings().weight
    hidden = ait.last_hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
    logits = F.linear(hidden, head.weight, head.bias) * head.scale
    if head.softcap:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    expected = model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert_close(logits, expected, rtol=RTOL, name=name)


def test_num_items_in_batch_and_shift_labels_as_in_transformers():
    model, inputs = tiny("qwen2"), batch()
    for extra in (dict(num_items_in_batch=torch.tensor(37)), dict(num_items_in_batch=11)):
        ref = loss_and_grads(model, **inputs, **extra)
        ait.apply(model)
        assert_same(loss_and_grads(model, **inputs, **extra), ref, str(extra))
        ait.revert(model)
    shift = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    ref = loss_and_grads(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         labels=inputs["labels"])
    ait.apply(model)
    fused = loss_and_grads(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           shift_labels=shift)
    assert_same(fused, ref, "shift_labels")


def test_logits_to_keep_with_labels():
    model, inputs = tiny("mistral"), batch(padded=False)
    k = 4
    args = dict(input_ids=inputs["input_ids"], labels=inputs["labels"][:, -k:], logits_to_keep=k)
    ref = loss_and_grads(model, **args)
    ait.apply(model)
    assert_same(loss_and_grads(model, **args), ref, "logits_to_keep")


def test_without_labels_the_original_forward_runs():
    model, inputs = tiny("phi"), batch()
    inputs.pop("labels")
    expected, last = model(**inputs).logits, model(inputs["input_ids"], logits_to_keep=1).logits
    ait.apply(model)
    assert torch.equal(model(**inputs).logits, expected)
    assert torch.equal(model(inputs["input_ids"], logits_to_keep=1).logits, last)


def test_positional_arguments_return_dict_and_signature():
    model, inputs = tiny("gpt2"), batch()
    ref = model(**inputs).loss
    ait.apply(model)
    # GPT-2's second positional parameter is the cache, not the mask: binding is by the real signature.
    out = model(inputs["input_ids"], None, inputs["attention_mask"], labels=inputs["labels"])
    assert_close(out.loss, ref, rtol=RTOL, name="positional")
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[1] is None  # the logits slot stays: out[2] is the cache
    assert len(as_tuple) == len(ait.revert(model)(**inputs, return_dict=False))
    ait.apply(model)
    assert_close(as_tuple[0], ref, rtol=RTOL, name="tuple")
    params = inspect.signature(model.forward).parameters  # what transformers.Trainer inspects
    assert "labels" in params and "input_ids" in params and "self" not in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_loss_options_reach_the_fused_loss():
    model, inputs = tiny("llama"), batch()
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    shift = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, V), shift.reshape(-1), label_smoothing=0.1)
    ait.apply(model, label_smoothing=0.1, backend="chunked", chunk_size=5)
    assert_close(model(**inputs).loss, expected, rtol=RTOL, name="label_smoothing")
    with pytest.raises(ValueError, match="unknown loss options"):
        ait.apply(model, temperature=2.0)


def test_reapply_revert_and_an_existing_instance_forward_are_restored_exactly():
    model, inputs = tiny("llama"), batch()
    hook = functools.partial(type(model).forward, model)  # what accelerate's hooks leave on an instance
    model.forward = hook
    ait.apply(model)
    ait.apply(model, backend="chunked")  # re-applying replaces the options, keeps the first original
    assert ait.is_applied(model) and model(**inputs).logits is None
    ait.revert(model)
    assert model.__dict__["forward"] is hook and not ait.is_applied(model)
    ait.revert(model)  # no-op
    assert model.__dict__["forward"] is hook


def test_deepcopy_of_an_applied_model_is_applied_to_itself():
    model, inputs = tiny("qwen3"), batch()
    ait.apply(model)
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    assert_close(clone(**inputs).loss, model(**inputs).loss, rtol=0, atol=0, name="clone")
    ait.revert(clone)
    assert clone(**inputs).logits is not None and model(**inputs).logits is None


def test_all_labels_ignored_gives_zero_and_zero_grads():
    model, inputs = tiny("llama"), batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    ait.apply(model)
    out, grads = loss_and_grads(model, **inputs)
    assert out.loss.item() == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())
