"""Sequence packing: best-fit decreasing, packed rows (every token once, positions restarting per
example, first-token labels masked) and the block-diagonal causal mask."""
import random

import pytest
import torch

from alignfast.data import PackedCollator, best_fit_decreasing, pack_examples, packed_inputs
from alignfast.data.encode import truncate
from alignfast.data.packing import block_causal_mask


def naive_bfd_fills(lengths, capacity):
    """Best-fit decreasing by scanning every bin: the sorted bin totals (ties between bins with equal free
    space are interchangeable, so the totals do not depend on how they are broken)."""
    fills = []
    for n in sorted(lengths, reverse=True):
        fitting = [b for b, f in enumerate(fills) if f + n <= capacity]
        if fitting:
            best = min(fitting, key=lambda b: capacity - fills[b])
            fills[best] += n
        else:
            fills.append(n)
    return sorted(fills)


def test_bfd_small_case():
    # 6 -> new bin (4 left); 5 -> new bin (5 left); 4 -> the bin with 4 left (best fit, not first with room);
    # 3 -> the bin with 5 left; 2 -> the same (2 left)
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    # best fit, not first fit: the 1 goes to the bin with 2 left, not to the first one (3 left)
    assert best_fit_decreasing([7, 4, 4, 1], 10) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("n,capacity,seed", [(1, 7, 0), (50, 16, 1), (300, 64, 2), (257, 1, 3), (400, 2048, 4)],
                         ids=lambda v: str(v))
def test_bfd_every_index_once_and_bins_fit(n, capacity, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(0 if capacity > 1 else 1, capacity) for _ in range(n)]
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(n))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert sorted(sum(lengths[i] for i in b) for b in bins) == naive_bfd_fills(lengths, capacity)
    assert len(bins) >= -(-sum(lengths) // capacity)


def test_bfd_rejects_too_long():
    with pytest.raises(ValueError, match="lengths must be in"):
        best_fit_decreasing([3, 11], 10)


def random_examples(rng, n, vocab=50):
    """SFT examples of varied lengths (token ids >= 3: 0 is the pad id)."""
    out = []
    for _ in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(0, 12))]
        c = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]
        out.append({"prompt_ids": p, "completion_ids": c})
    return out


@pytest.mark.parametrize("completion_only", [True, False])
def test_packed_rows_hold_every_token_once(completion_only):
    rng = random.Random(0)
    max_length = 24
    examples = random_examples(rng, 40)
    examples.append({"prompt_ids": list(range(3, 23)), "completion_ids": list(range(23, 43))})  # 40 > 24
    rows = pack_examples(examples, max_length)
    batch = PackedCollator(0, completion_only=completion_only)(rows)
    ids, labels, pos, mask = batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"]
    assert ids.shape == labels.shape == pos.shape == mask.shape and ids.shape[1] <= max_length
    assert (mask.sum(1) <= max_length).all()

    seen = []  # (row, start) of each example found in the rows, in order
    for b, row in enumerate(rows):
        t = 0
        for e in row["examples"]:
            p, c = e["prompt_ids"], e["completion_ids"]
            n = len(p) + len(c)
            assert ids[b, t:t + n].tolist() == p + c
            assert pos[b, t:t + n].tolist() == list(range(n))  # restart at each example
            want = ([-100] * len(p) if completion_only else list(p)) + list(c)
            want[0] = -100  # never predicted from the previous example
            assert labels[b, t:t + n].tolist() == want
            seen.append(e)
            t += n
        assert int(mask[b].sum()) == t and (labels[b, t:] == -100).all() and (ids[b, t:] == 0).all()
    # every example exactly once (the long one truncated as encode.truncate does)
    expected = [truncate(e["prompt_ids"], e["completion_ids"], max_length) for e in examples]
    got = [(e["prompt_ids"], e["completion_ids"]) for e in seen]
    assert sorted(map(repr, got)) == sorted(map(repr, expected))
    assert (list(range(3, 23)), list(range(23, 27))) in got  # 20 + 40 tokens -> the completion's end cut
    # the loss normaliser: as many completion targets as unpacked (whose position 0 is never a target)
    n_unpacked = sum(len(c) - (len(p) == 0) for p, c in expected) if completion_only else \
        sum(len(p) + len(c) - 1 for p, c in expected)
    assert int((labels[:, 1:] != -100).sum()) == n_unpacked


def test_pack_examples_empty():
    assert pack_examples([], 16) == []


def test_block_causal_mask():
    # row 0: examples of 2 and 3 tokens, 1 padding; row 1: one example of 4, 2 padding
    pos = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    seg = [[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
    want = torch.tensor([[[k <= q and s[k] == s[q] for k in range(6)] for q in range(6)] for s in seg])
    got = block_causal_mask(pos, att)
    assert got.shape == (2, 1, 6, 6) and got.dtype == torch.bool
    assert torch.equal(got[:, 0], want)
    assert got.any(-1).all()  # no empty row (softmax of an all-masked row is NaN)


def test_packed_inputs_layouts():
    rows = pack_examples(random_examples(random.Random(1), 12), 20)
    batch = PackedCollator(0)(rows)
    for impl in ("sdpa", "eager"):
        inputs, labels = packed_inputs(batch, impl)
        assert inputs["attention_mask"].shape == (len(rows), 1, labels.shape[1], labels.shape[1])
        assert inputs["attention_mask"].dtype == (torch.bool if impl == "sdpa" else torch.float32)
        assert labels is batch["labels"] and inputs["position_ids"] is batch["position_ids"]
    inputs, labels = packed_inputs(batch, "flash_attention_2")  # padding-free: one row, no mask
    n = int(batch["attention_mask"].sum())
    assert inputs["attention_mask"] is None and inputs["input_ids"].shape == labels.shape == (1, n)
    assert torch.equal(inputs["position_ids"][0], batch["position_ids"][batch["attention_mask"].bool()])
    assert int((labels[:, 1:] != -100).sum()) == int((batch["labels"][:, 1:] != -100).sum())
