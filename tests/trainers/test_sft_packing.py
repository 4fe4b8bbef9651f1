"""SFT with packing=true: the loss and gradients of packed rows equal those of the same examples unpacked
(the block-diagonal mask works: a plain causal mask fails the same check), and a packed run from the
command line trains."""
import json

import pytest
import torch

from alignfast.cli import main
from alignfast.data import toy, write_jsonl
from alignfast.trainers.modeling import unwrap_causal_lm
from trainer_helpers import make_trainer

# varied lengths (toy arithmetic, longer worded prompts, one over max_length=32 that gets truncated)
RECORDS = toy.sft_records(14, seed=3) + [
    {"prompt": f"What is {a} plus {b}? ", "completion": f"It is {a + b}."} for a, b in [(3, 4), (12, 30), (7, 8)]
] + [{"prompt": "Count up: " + " ".join(map(str, range(12))), "completion": " 12 13 14"},
     {"prompt": "", "completion": "no prompt at all"}]
PARAMS = ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight",
          "lm_head.weight")


def loss_and_grads(tr):
    """The SFT loss (mean over completion tokens) of the whole training set in one batch, its token
    count, and the gradients of a few parameters."""
    batch = tr.to_device(tr.collator(tr.train_data))
    tr.model.zero_grad(set_to_none=True)
    loss, _ = tr.compute_loss(tr.model, batch)
    n = tr.count_items(batch)
    (loss / n).backward()
    grads = {name.split("causal_lm.")[-1].removeprefix("model."): p.grad.clone()
             for name, p in tr.model.named_parameters() if name.endswith(PARAMS)}
    assert len(grads) == len(PARAMS)
    return loss.item() / n, n, grads


def with_attention(tr, impl):
    unwrap_causal_lm(tr.accelerator.unwrap_model(tr.model)).set_attn_implementation(impl)
    tr.attn_implementation = impl
    return tr


@pytest.fixture(params=[True, False], ids=["completion_only", "full_sequence"])
def pair(request, tiny_model_dir, tmp_path):
    """(unpacked, packed) SFT trainers on the same records and model."""
    opts = [f"completion_only_loss={request.param}"]
    return (make_trainer("sft", tiny_model_dir, tmp_path / "plain", opts, records=RECORDS),
            make_trainer("sft", tiny_model_dir, tmp_path / "packed", opts + ["packing=true"], records=RECORDS))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "padding_free"])
def test_packed_loss_and_gradients_equal_unpacked(attn, pair):
    plain, packed = pair
    assert len(packed.train_data) < len(plain.train_data) == len(RECORDS)  # rows hold several examples
    with_attention(plain, "sdpa" if attn == "padding_free" else attn)
    with_attention(packed, "sdpa" if attn == "padding_free" else attn)
    if attn == "padding_free":  # the flash-attention layout (one row, position_ids, no mask), run on sdpa:
        packed.attn_implementation = "flash_attention_2"  # transformers then finds the boundaries itself
    loss_a, n_a, grads_a = loss_and_grads(plain)
    loss_b, n_b, grads_b = loss_and_grads(packed)
    assert n_a == n_b  # same normaliser: no target across an example boundary
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in PARAMS:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_plain_causal_mask_over_packed_rows_differs(attn, pair, monkeypatch):
    """The check above can fail: attending across examples changes the loss."""
    plain, packed = pair
    with_attention(plain, attn)
    with_attention(packed, attn)
    right, _, grads = loss_and_grads(packed)
    assert right == pytest.approx(loss_and_grads(plain)[0], rel=1e-5)

    def causal(position_ids, attention_mask):
        t = position_ids.shape[1]
        keys = attention_mask.bool()[:, None, None, :] | torch.eye(t, dtype=torch.bool)  # no empty row
        return torch.ones(t, t, dtype=torch.bool).tril() & keys

    monkeypatch.setattr("alignfast.data.packing.block_causal_mask", causal)
    wrong, _, wrong_grads = loss_and_grads(packed)
    assert abs(wrong - right) > 10 * 1e-5 * abs(right), (wrong, right)  # 10x the tolerance of the check
    for name in PARAMS:  # the gradients show it more (here by 20-70% of their largest element)
        assert (wrong_grads[name] - grads[name]).abs().max() > 0.05 * grads[name].abs().max(), name


def test_packing_needs_max_length(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="packing"):
        make_trainer("sft", tiny_model_dir, tmp_path, ["packing=true", "max_length=null"], records=RECORDS)


def test_packed_run_from_the_command_line_trains(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(toy.sft_records(48), tmp_path / "d.jsonl")
    rc = main(["train", "sft", "--model", tiny_model_dir, "--dataset", data, "--output-dir", str(tmp_path / "o"),
               "packing=true", "max_length=48", "per_device_batch_size=2", "max_steps=12", "learning_rate=3e-3",
               "logging_steps=1", "disable_tqdm=true"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    assert out["loss"] == pytest.approx(losses[-1])
