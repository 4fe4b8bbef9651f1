"""The online stages' foundation: seeded sampling, EOS cuts, the rollout collator's alignment, prompt
datasets and reward sources."""
import math

import pytest
import torch

from alignfast.data import IGNORE_INDEX, RolloutCollator, encode_record, prepare_dataset
from alignfast.models.tiny import tiny_llama, tiny_tokenizer
from alignfast.trainers.generation import Sampling, cut_at_eos, sample_completions
from alignfast.trainers.rewards import Rewards


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_llama(tok, seed=0)


def prompt_ids(tok, texts=("12+7=", "3*4=", "100-1=", "x")):
    return [tok(t).input_ids for t in texts]


def sample(lm, tok, prompts, sampling, **kw):
    return sample_completions(lm, prompts, sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              **kw)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(lm, tok):
    prompts, sampling = prompt_ids(tok), Sampling(max_new_tokens=8, temperature=1.0)
    a = sample(lm, tok, prompts, sampling, seed=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    b = sample(lm, tok, prompts, sampling, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG did not move
    torch.manual_seed(123)  # nor does it matter
    c = sample(lm, tok, prompts, sampling, seed=5)
    assert a == b == c
    assert sample(lm, tok, prompts, sampling, seed=6) != a
    assert lm.training  # the model's mode is restored (tiny_llama is in train mode)


def test_greedy_batched_left_padded_equals_one_by_one(lm, tok):
    prompts, sampling = prompt_ids(tok), Sampling(max_new_tokens=6, temperature=0.0)
    one_by_one = [sample(lm, tok, [p], sampling)[0] for p in prompts]
    assert sample(lm, tok, prompts, sampling) == one_by_one
    assert sample(lm, tok, prompts, sampling, batch_size=3) == one_by_one


def test_the_checkpoints_generation_defaults_do_not_change_sampling(lm, tok):
    """A generation_config.json's repetition_penalty / no_repeat_ngram_size would sample from another
    distribution than the one the losses score: they are not used, and left as they were."""
    prompts, greedy = prompt_ids(tok), Sampling(max_new_tokens=8, temperature=0.0)
    plain = sample(lm, tok, prompts, greedy)
    defaults = lm.generation_config
    defaults.repetition_penalty, defaults.no_repeat_ngram_size = 50.0, 1
    try:
        assert sample(lm, tok, prompts, greedy) == plain
        assert lm.generation_config is defaults
    finally:
        defaults.repetition_penalty, defaults.no_repeat_ngram_size = None, None
    assert any(len(set(c)) < len(c) for c in plain)  # a repeat the options would have forbidden


def test_completions_are_cut_after_their_first_eos(tok):
    assert cut_at_eos([5, 6, 2, 7, 2], 2) == ([5, 6, 2], True)
    assert cut_at_eos([5, 6], 2) == ([5, 6], False)
    assert cut_at_eos([5, 6], None) == ([5, 6], False)
    eos = tok.eos_token_id
    lm = tiny_llama(tok, seed=1)
    head = lm.lm_head  # an EOS bias, so that about half the completions end before max_new_tokens
    lm.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        lm.lm_head.weight.copy_(head.weight)
        lm.lm_head.bias.zero_()
        lm.lm_head.bias[eos] = 3.0
    out = sample(lm, tok, prompt_ids(tok) * 8, Sampling(max_new_tokens=8), seed=0)
    ended = [c for c in out if eos in c]
    assert 0 < len(ended) < len(out)
    for c in out:
        assert 1 <= len(c) <= 8 and eos not in c[:-1]  # EOS only as the last token, no padding after it
        assert c[-1] == eos or len(c) == 8


def test_rollout_collator_aligns_token_fields_with_the_shifted_labels(tok):
    rows = [{"prompt_ids": [1, 10, 11], "completion_ids": [20, 21, 2], "adv": 0.5},
            {"prompt_ids": [1, 12], "completion_ids": [22, 23, 24, 25, 2], "adv": -1.0}]
    for r in rows:  # a distinct value per completion token: 100·row + the token's index
        r["old"] = [100.0 * (r["adv"] > 0) + j + 1 for j in range(len(r["completion_ids"]))]
    batch = RolloutCollator(tok.pad_token_id, token_fields=("old",), sequence_fields=("adv",))(rows)
    targets = batch["labels"][:, 1:]
    assert batch["old"].shape == targets.shape and batch["old"].dtype == torch.float32
    for b, r in enumerate(rows):
        where = targets[b] != IGNORE_INDEX
        assert targets[b][where].tolist() == r["completion_ids"]  # the completion, once, in order
        assert batch["old"][b][where].tolist() == r["old"]
        assert not batch["old"][b][~where].any()  # 0 on prompt and padding
    assert batch["adv"].tolist() == [0.5, -1.0]


def test_prompt_records_keep_their_other_columns(tok):
    ex = encode_record({"prompt": "12+7=", "answer": "19", "level": 2}, "prompt", tok)
    assert ex["prompt_ids"] == tok("12+7=").input_ids and ex["prompt_ids"][0] == tok.bos_token_id
    assert ex["prompt"] == "12+7=" and ex["columns"] == {"answer": "19", "level": 2}
    chat = [{"role": "user", "content": "hi"}]
    ex = encode_record({"prompt": chat}, "prompt", tok)
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>") and tok.decode(ex["prompt_ids"]) == text and ex["prompt"] == chat
    ex = encode_record({"prompt": "0123456789"}, "prompt", tok, max_length=8)  # room for generation: the end
    assert tok.decode(ex["prompt_ids"]) == "6789"
    data = prepare_dataset([{"prompt": "a"}, {"answer": "1"}], "prompt", tok, on_bad_record="skip")
    assert len(data) == 1 and data.bad[0][0] == 1
    with pytest.raises(ValueError, match="record #0"):
        prepare_dataset([{"prompt": ""}], "prompt", tok)


def examples(tok, n=3):
    return [encode_record({"prompt": f"{i}+1=", "answer": str(i + 1)}, "prompt", tok) for i in range(n)]


def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def correct(prompts, completions, answer, **kw):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def test_rewards_weight_and_sum_their_sources(tok):
    ex = examples(tok)
    ids = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in ("1", "22", "333")]
    rewards = Rewards([length, correct], [0.5, 2.0], tok, tok.pad_token_id)
    total, per_source = rewards(ex, ids)  # decoded without the EOS; `answer` passed as a column
    assert per_source["length"].tolist() == [1.0, 2.0, 3.0] and per_source["correct"].tolist() == [1.0, 0.0, 0.0]
    assert total.tolist() == [2.5, 1.0, 1.5]
    both = Rewards([length, length], None, tok, tok.pad_token_id)
    assert both.names == ["length_0", "length_1"] and both(ex, ids)[0].tolist() == [2.0, 4.0, 6.0]


def test_bad_reward_sources_are_value_errors(tok):
    ex, ids = examples(tok), [[10], [11], [12]]
    with pytest.raises(ValueError, match="returned 2 values for 3"):
        Rewards([lambda p, c, **k: [1.0, 2.0]], None, tok, tok.pad_token_id)(ex, ids)
    with pytest.raises(ValueError, match="<lambda> must return one float per completion"):
        Rewards([lambda p, c, **k: [1.0, None, 0.0]], None, tok, tok.pad_token_id)(ex, ids)
    with pytest.raises(ValueError, match="must return one float per completion"):
        Rewards([lambda p, c, **k: 1.0], None, tok, tok.pad_token_id)(ex, ids)
    with pytest.raises(ValueError, match="non-finite"):
        Rewards([lambda p, c, **k: [1.0, math.nan, 0.0]], None, tok, tok.pad_token_id)(ex, ids)
    with pytest.raises(ValueError, match="reward_weights"):
        Rewards([length], [1.0, 1.0], tok, tok.pad_token_id)
    with pytest.raises(ValueError, match="at least one reward source"):
        Rewards([], None, tok, tok.pad_token_id)
