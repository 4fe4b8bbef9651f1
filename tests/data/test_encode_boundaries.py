"""Where the completion starts, as TRL 1.16 finds it, on tokenizers where that is not obvious:
tokens that merge across the prompt/completion boundary, EOS already present, chat templates whose
generation prompt differs, tool calls, template kwargs; and the rows truncation produces."""
import json
import logging

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from alignfast.data import SFTCollator, UnpairedCollator, prepare_dataset
from alignfast.data.encode import encode_pair
from alignfast.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def metaspace():
    """A Llama-2 / Mistral-style tokenizer: '▁' marks a word start (the first one too), BOS prepended."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["Question: what is 2+2? Answer: 4", "the answer is 4", "hello world"] * 20
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>",
                                                                                         "<pad>"]))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_completion_has_no_invented_word_start(metaspace):
    """Tokenized alone, ' 4'... became '▁4': the model would learn a space the data does not have."""
    prompt, completion = "Question: what is 2+2? Answer:", " 4"
    p, c = encode_pair(metaspace, prompt, completion)
    whole = metaspace(prompt + completion).input_ids + [metaspace.eos_token_id]
    assert p + c == whole and c[-1] == metaspace.eos_token_id
    assert metaspace.decode(p + c, skip_special_tokens=True) == prompt + completion
    glued = encode_pair(metaspace, "Answer:", "4")  # no space in the data: none in the tokens
    assert metaspace.decode(sum(glued, []), skip_special_tokens=True) == "Answer:4"


def test_eos_is_not_doubled(tok):
    p, c = encode_pair(tok, "1+1=", "2<eos>")
    assert tok.decode(c) == "2<eos>"


def test_generation_prompt_that_the_conversation_does_not_repeat(tok):
    """Templates such as DeepSeek-R1's add text to the generation prompt only: the completion starts
    where the two renderings' tokens diverge (TRL's common prefix), rather than every record failing."""
    t = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                                pad_token=tok.pad_token)
    t.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|assistant|>think:' }}{% else %}{{ '<eos>' }}{% endif %}")
    ds = prepare_dataset([{"prompt": [{"role": "user", "content": "1+1="}],
                           "completion": [{"role": "assistant", "content": "2"}]}], "sft", t)
    e = ds.examples[0]
    assert t.decode(e["prompt_ids"]) == "<|user|>1+1=<|assistant|>" and t.decode(e["completion_ids"]) == "2<eos>"


def test_tools_and_template_kwargs_reach_the_template(tok):
    t = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                                pad_token=tok.pad_token)
    t.chat_template = ("{% if tools %}{{ 'tools:' + tools | length | string }}{% endif %}{% if brief %}b{% endif %}"
                       "{% for m in messages %}{{ '<|' + m['role'] + '|>' + (m['content'] or 'call') }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ '<eos>' }}{% endif %}")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    record = {"prompt": [{"role": "user", "content": "1+1="}],
              "completion": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add"}}]}],
              "tools": json.dumps(tools), "chat_template_kwargs": {"brief": True}}
    e = prepare_dataset([record], "sft", t).examples[0]
    assert t.decode(e["prompt_ids"]).startswith("tools:1b<|user|>") and t.decode(e["completion_ids"]) == "call<eos>"


def test_template_errors_are_bad_records_with_their_index(tok, caplog):
    t = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                                pad_token=tok.pad_token)
    t.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                       "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with caplog.at_level(logging.WARNING):
        ds = prepare_dataset([ok, bad, {"messages": 5}], "sft", t, on_bad_record="skip")
    assert [i for i, _ in ds.bad] == [1, 2] and "roles must alternate" in ds.bad[0][1]
    with pytest.raises(ValueError, match=r"record #1: the chat template refused it"):
        prepare_dataset([ok, bad], "sft", t)


def test_pairs_identical_within_max_length_are_bad_records(tok):
    recs = [{"prompt": "1" * 20, "chosen": "23", "rejected": "24"}, {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    ds = prepare_dataset(recs, "preference", tok, max_length=22, on_bad_record="skip")
    assert [i for i, _ in ds.bad] == [0] and "carries no preference" in ds.bad[0][1]


def test_truncated_generation_prompts_are_reported(tok, caplog):
    with caplog.at_level(logging.WARNING):
        ds = prepare_dataset([{"prompt": "1" * 30}, {"prompt": "2+2="}], "prompt", tok, max_length=16)
    assert len(ds.examples[0]["prompt_ids"]) == 8 and "truncated" not in ds.examples[0]
    assert "1 of 2 prompts are longer than max_length // 2 = 8" in caplog.text


def test_kto_mismatched_rows_keep_to_max_length(tok):
    recs = [{"prompt": "1" * 12, "completion": "2", "label": True}, {"prompt": "3", "completion": "4" * 12,
                                                                     "label": False}]
    ds = prepare_dataset(recs, "unpaired", tok, max_length=16)
    b = UnpairedCollator(tok.pad_token_id, max_length=16)(ds.examples)
    assert b["kl_attention_mask"].sum(-1).max() <= 16 and b["input_ids"].shape[1] <= 16
    assert SFTCollator(tok.pad_token_id)(ds.examples)["input_ids"].shape[1] <= 16
