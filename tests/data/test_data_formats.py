"""Column conventions, malformed records (reported by index), encoding and collators."""
import json

import pytest
import torch

from alignfast.data import (BadRecord, PreferenceCollator, SFTCollator, UnpairedCollator, check_record,
                            load_records, prepare_dataset, write_jsonl)
from alignfast.data import toy
from alignfast.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("kind,record,match", [
    ("sft", {"prompt": "1+1="}, "missing column"),
    ("sft", {"prompt": "1+1=", "completion": "   "}, "empty"),
    ("sft", {"prompt": "1+1=", "completion": 2}, "must be a string"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "end with an assistant"),
    ("preference", {"prompt": "1+1=", "chosen": "2"}, "rejected"),
    ("preference", {"prompt": "1+1=", "chosen": "2", "rejected": ""}, "empty"),
    ("preference", {"prompt": "a", "chosen": "2", "rejected": "3", "margin": "big"}, "margin"),
    ("unpaired", {"prompt": "1+1=", "completion": "2", "label": "yes"}, "bool"),
    ("unpaired", ["not", "a", "dict"], "must be a dict"),
    ("sft", {"prompt": [{"role": "user", "content": "x"}], "completion": "2"}, "mix"),
    ("sft", {"prompt": [], "completion": [{"role": "wizard", "content": "x"}]}, "unknown role"),
])
def test_bad_records_are_named(kind, record, match):
    with pytest.raises(BadRecord, match=match):
        check_record(record, kind)


def test_good_records_pass():
    for kind, make in toy.RECORDS.items():
        for conv in (False, True):
            for r in make(5, conversational=conv):
                check_record(r, kind)


def test_prepare_reports_index_then_skips_or_errors(tok, caplog):
    records = toy.sft_records(4)
    records.insert(2, {"prompt": "1+1=", "completion": ""})
    records.append({"prompt": "x"})
    with pytest.raises(ValueError, match=r"record #2: .*empty"):
        prepare_dataset(records, "sft", tok, on_bad_record="error")
    ds = prepare_dataset(records, "sft", tok, on_bad_record="skip")
    assert len(ds) == 4 and [i for i, _ in ds.bad] == [2, 5]
    assert "record #2" in caplog.text and "record #5" in caplog.text


def test_jsonl_with_broken_line_is_a_bad_record(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(toy.sft_records(3), path)
    with open(path, "a") as f:
        f.write("{not json\n")
    records = load_records(str(path))
    assert len(records) == 4
    assert len(prepare_dataset(records, "sft", tok, on_bad_record="skip")) == 3


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = toy.preference_records(5)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "p.parquet")
    assert load_records(str(tmp_path / "p.parquet")) == recs


def test_sft_collator_masks_prompt_and_padding(tok):
    ds = prepare_dataset([{"prompt": "12+7=", "completion": "19"}, {"prompt": "1+1=", "completion": "2"}], "sft", tok)
    b = SFTCollator(tok.pad_token_id)(ds.examples)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 9)
    assert tok.decode(b["input_ids"][0]) == "<bos>12+7=19<eos>"
    # prompt (<bos>12+7= : 6 tokens) masked, completion "19<eos>" kept
    assert (b["labels"][0, :6] == -100).all() and tok.decode(b["labels"][0, 6:]) == "19<eos>"
    # second row: <bos>1+1=2<eos> is 7 tokens, 2 pad positions masked in labels and attention
    assert b["attention_mask"][1].tolist() == [1] * 7 + [0] * 2 and b["labels"][1, -1] == -100
    assert tok.decode(b["labels"][1][b["labels"][1] != -100]) == "2<eos>"


def test_conversational_completion_is_the_assistant_turn(tok):
    ds = prepare_dataset(toy.sft_records(3, conversational=True), "sft", tok)
    b = SFTCollator(tok.pad_token_id)(ds.examples[:1])
    text = tok.decode(b["labels"][0][b["labels"][0] != -100])
    answer = toy.sft_records(3, conversational=True)[0]["messages"][-1]["content"]
    assert text == answer + "<eos>"
    assert "<|assistant|>" in tok.decode(b["input_ids"][0])


def test_preference_collator_stacks_chosen_then_rejected(tok):
    recs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5},
            {"prompt": "2+2=", "chosen": "4", "rejected": "14", "margin": 1.0}]
    b = PreferenceCollator(tok.pad_token_id)(prepare_dataset(recs, "preference", tok).examples)
    assert b["input_ids"].shape[0] == 4
    kept = [tok.decode(row[row != -100]) for row in b["labels"]]
    assert kept == ["2<eos>", "4<eos>", "3<eos>", "14<eos>"]
    assert torch.equal(b["margin"], torch.tensor([0.5, 1.0]))


def test_unpaired_collator_builds_mismatched_pairs(tok):
    recs = toy.unpaired_records(3)
    b = UnpairedCollator(tok.pad_token_id)(prepare_dataset(recs, "unpaired", tok).examples)
    assert b["label"].tolist() == [r["label"] for r in recs]
    for i in range(3):
        prompt = tok.decode(b["kl_input_ids"][i][b["kl_labels"][i] == -100][b["kl_attention_mask"][i][b["kl_labels"][i] == -100] == 1])
        completion = tok.decode(b["kl_labels"][i][b["kl_labels"][i] != -100])
        assert prompt == "<bos>" + recs[i]["prompt"] and completion == recs[i - 1]["completion"] + "<eos>"


def test_truncation_keeps_a_completion_token(tok):
    ds = prepare_dataset([{"prompt": "1" * 40, "completion": "2" * 40}], "sft", tok, max_length=16)
    e = ds.examples[0]
    assert len(e["prompt_ids"]) + len(e["completion_ids"]) == 16 and len(e["completion_ids"]) >= 1


def test_toy_records_are_correct():
    for r in toy.preference_records(20):
        a = eval(r["prompt"][:-1])  # noqa: S307 - our own arithmetic strings
        assert r["chosen"] == str(a) and r["rejected"] != str(a)
    assert json.dumps(toy.unpaired_records(3))  # JSON-serialisable


def test_saved_dataset_directory_and_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = toy.sft_records(5)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "one"))
    assert load_records(str(tmp_path / "one")) == records
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:3]),
                                 "test": datasets.Dataset.from_list(records[3:])})
    both.save_to_disk(str(tmp_path / "both"))
    assert load_records(str(tmp_path / "both")) == records[:3]
    assert load_records(str(tmp_path / "both"), split="test") == records[3:]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_records(str(tmp_path / "both"), split="validation")


def test_data_folder_goes_through_load_dataset(tmp_path):
    """A folder of data files is what `datasets.load_dataset` resolves a hub id to: the same call."""
    pytest.importorskip("datasets")
    records = toy.sft_records(4)
    (tmp_path / "data").mkdir()
    write_jsonl(records[:3], tmp_path / "data" / "train.jsonl")
    write_jsonl(records[3:], tmp_path / "data" / "test.jsonl")
    assert load_records(str(tmp_path / "data")) == records[:3]
    assert load_records(str(tmp_path / "data"), split="test") == records[3:]


def test_unreachable_hub_id_is_a_value_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # offline, as on this machine and on many clusters (read at import, so patched where they are kept)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="alignfast-no-such-org/no-such-dataset"):
        load_records("alignfast-no-such-org/no-such-dataset")
    with pytest.raises(ValueError, match="does not exist"):
        load_records("missing.jsonl")
