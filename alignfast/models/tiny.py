"""A character-level tokenizer and a tiny Llama, built in code: tests and the demo never download.

    tok = tiny_tokenizer()                 # PreTrainedTokenizerFast, one token per character
    model = tiny_llama(tok, seed=0)        # LlamaForCausalLM, hidden 64, 2 layers
"""
from __future__ import annotations

import string

import torch

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHARS = string.digits + string.ascii_letters + " +-*/=?!.,:;'\"()\n"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}<eos>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per character of `CHARS`, a BOS prepended to every
    encoded text, `<pad>`/`<eos>`/`<unk>` and role tokens for a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(ROLE_TOKENS)
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, vocab[bos])])
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIAL_TOKENS["pad"],
                                  bos_token=bos, eos_token=SPECIAL_TOKENS["eos"],
                                  unk_token=SPECIAL_TOKENS["unk"], padding_side="right")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(tokenizer=None, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
               tie_word_embeddings: bool = False):
    """A randomly initialised `LlamaForCausalLM` (hidden 64, 2 layers, 4 heads) for `tokenizer`'s vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_tiny(path, *, seed: int = 0) -> str:
    """Writes a tiny Llama and its tokenizer to `path` (a directory), returns the path."""
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
