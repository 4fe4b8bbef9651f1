"""The fused preference modules against their functional losses on materialised float64 log-probs."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import alignfast
import alignfast.ops.chunked as chunked
from alignfast.losses.dpo import dpo_loss
from alignfast.losses.fused_preference import LinearCPOLoss, LinearDPOLoss, LinearORPOLoss, LinearSimPOLoss
from alignfast.losses.preference import cpo_loss, orpo_loss, simpo_loss

P, T, H, V = 3, 6, 10, 47  # 3 pairs: 6 rows


def token_logps(hidden, weight, bias, labels):
    """Oracle: float64 logits, log_softmax, the targets' log-probs, 0 at ignored positions."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    valid = labels != -100
    lp = F.log_softmax(logits, -1).gather(-1, labels.where(valid, 0)[..., None]).squeeze(-1)
    return lp * valid


def make_pairs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    labels = torch.randint(0, V, (2 * P, T), generator=g)
    prompt = torch.tensor([2, 1, 3, 2, 1, 3])  # chosen and rejected share the prompt
    labels[torch.arange(T) < prompt[:, None]] = -100
    labels[1, -1] = labels[4, -2:] = -100  # padding
    policy = dict(hidden=rnd(2 * P, T, H), weight=rnd(V, H, scale=H**-0.5), bias=rnd(V))
    ref = dict(ref_hidden=rnd(2 * P, T, H), ref_weight=rnd(V, H, scale=H**-0.5), ref_bias=rnd(V))
    return policy, ref, labels


def ref_inputs(mode, ref, labels):
    if mode == "none":
        return {}
    if mode == "hidden":
        return ref
    lp = token_logps(ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"], labels).to(ref["ref_hidden"].dtype)
    return dict(ref_logps=lp if mode == "token" else lp.sum(-1))


def expected_dpo(policy, ref, labels, **kw):
    lp = token_logps(policy["hidden"], policy["weight"], policy["bias"], labels).sum(-1)
    rlp = token_logps(ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"], labels).sum(-1)
    lengths = (labels != -100).sum(-1)
    losses, cr, rr = dpo_loss(lp[:P], lp[P:], rlp[:P], rlp[P:], chosen_lengths=lengths[:P],
                              rejected_lengths=lengths[P:], **kw)
    return losses.mean(), {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
                           "rewards/margins": (cr - rr).mean(), "rewards/accuracies": (cr > rr).double().mean(),
                           "logps/chosen": lp[:P].mean(), "logps/rejected": lp[P:].mean()}


def check(module, expected_fn, dtype, ref_mode, backend="chunked", **kw):
    policy, ref, labels = make_pairs(dtype)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    loss, metrics = module(leaves["hidden"], leaves["weight"], labels, leaves["bias"],
                           **ref_inputs(ref_mode, ref, labels))
    oracle = {k: v.detach().double().requires_grad_() for k, v in policy.items()}
    want, want_metrics = expected_fn(oracle, {k: v.double() for k, v in ref.items()}, labels, **kw)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(loss, want, rtol=rtol, name="loss")
    got_grads = torch.autograd.grad(loss, list(leaves.values()))
    want_grads = torch.autograd.grad(want, list(oracle.values()))
    for got, exp, name in zip(got_grads, want_grads, leaves):
        assert_close(got, exp, rtol=rtol, name=name)
    for name, value in want_metrics.items():
        assert_close(metrics[name], value, rtol=rtol, atol=rtol, name=name)


DPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid", label_smoothing=0.1),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "hinge": dict(loss_type="hinge"),
    "apo_zero-fkl": dict(loss_type="sigmoid", f_divergence="forward_kl"),
    "aot": dict(loss_type="aot"),  # couples the pairs: the 4-projection path
}


FP64, FP32 = torch.float64, torch.float32
# (loss case, reference given as, dtype, chunk size): c9 and c20 pack 1 and 2-3 whole pairs per
# chunk (the fused 3-projection path); c4 is shorter than every pair (each pair in blocks of 4 rows).
SETTINGS = ([(case, mode, FP64, 9) for case in DPO_CASES for mode in ("hidden", "seq", "token")]
            + [(case, mode, FP32, 20) for case in ("sigmoid", "ipo") for mode in ("hidden", "seq")]
            + [(case, "hidden", dtype, 4) for case in ("sigmoid", "hinge") for dtype in (FP64, FP32)])


@pytest.mark.parametrize("case,ref_mode,dtype,chunk_size", SETTINGS,
                         ids=[f"{c}-{m}-{'fp64' if d == FP64 else 'fp32'}-c{n}" for c, m, d, n in SETTINGS])
def test_dpo(case, ref_mode, dtype, chunk_size):
    kw = DPO_CASES[case]
    check(LinearDPOLoss(backend="chunked", chunk_size=chunk_size, **kw), expected_dpo, dtype, ref_mode, **kw)


def test_dpo_reference_backend():
    kw = dict(loss_type="sigmoid")
    check(LinearDPOLoss(backend="reference", **kw), expected_dpo, torch.float64, "hidden", **kw)


class Counter:
    def __init__(self, monkeypatch):
        self.blocks = self.products = 0
        real_block, real_mm, real_addmm_ = chunked.logits_block, torch.mm, torch.Tensor.addmm_

        def wrap(real, attr):
            def f(*a, **k):
                setattr(self, attr, getattr(self, attr) + 1)
                return real(*a, **k)
            return f

        monkeypatch.setattr(chunked, "logits_block", wrap(real_block, "blocks"))
        monkeypatch.setattr(torch, "mm", wrap(real_mm, "products"))
        monkeypatch.setattr(torch.Tensor, "addmm_", wrap(real_addmm_, "products"))


@pytest.mark.parametrize("ref_mode", ["seq", "hidden"])
def test_dpo_projection_count(monkeypatch, ref_mode):
    policy, ref, labels = make_pairs(torch.float64)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    refs = ref_inputs(ref_mode, ref, labels)
    counter = Counter(monkeypatch)
    loss, _ = LinearDPOLoss(backend="chunked", chunk_size=9)(leaves["hidden"], leaves["weight"], labels, leaves["bias"], **refs)
    loss.backward()
    pair_tokens = [(labels[i] != -100).sum() + (labels[P + i] != -100).sum() for i in range(P)]
    assert max(pair_tokens) <= 9 and sum(pair_tokens) > 9  # several chunks of whole pairs
    policy_chunks = counter.products // 2  # grad_hidden + grad_weight per policy chunk
    ref_chunks = -(-int((labels != -100).sum()) // 9) if ref_mode == "hidden" else 0
    assert policy_chunks > 1
    assert counter.blocks == policy_chunks + ref_chunks  # policy: 1 block per chunk, no recompute


def pair_lengths(labels):
    return [int((labels[i] != -100).sum() + (labels[P + i] != -100).sum()) for i in range(P)]


@pytest.mark.parametrize("backend", [b for b in ("chunked", "cpp") if b in alignfast.backends("cpu")])
def test_dpo_pairs_longer_than_the_budget(monkeypatch, backend):
    """A byte budget smaller than every pair: no logits block exceeds it (it used to grow to the
    longest pair); the rows of a pair past its first block take one more projection; exact."""
    policy, ref, labels = make_pairs(torch.float64, seed=3)
    rows = 4
    monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", str(rows * V * 8))  # 4 fp64 rows of the vocab
    lengths = pair_lengths(labels)
    assert min(lengths) > rows
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    counter, block_rows, real_block = Counter(monkeypatch), [], chunked.logits_block

    def recording_block(hidden, *a, **k):
        block_rows.append(hidden.shape[0])
        return real_block(hidden, *a, **k)

    monkeypatch.setattr(chunked, "logits_block", recording_block)
    kw = dict(loss_type="sigmoid", beta=0.3)
    loss, _ = LinearDPOLoss(backend=backend, **kw)(leaves["hidden"], leaves["weight"], labels, leaves["bias"],
                                                   ref_logps=ref_inputs("seq", ref, labels)["ref_logps"])
    grads = torch.autograd.grad(loss, list(leaves.values()))
    monkeypatch.undo()

    assert max(block_rows) <= rows
    grad_blocks = sum(-(-n // rows) for n in lengths)            # each row's gradient once
    stats_blocks = sum(-(-(n - rows) // rows) for n in lengths)  # a pass over the rows past a pair's first block
    assert counter.products == 2 * grad_blocks
    assert len(block_rows) == grad_blocks + stats_blocks, (block_rows, lengths)

    oracle = {k: v.detach().requires_grad_() for k, v in policy.items()}
    want, _ = expected_dpo(oracle, {k: v.double() for k, v in ref.items()}, labels, **kw)
    assert_close(loss, want, rtol=1e-10, name="loss")
    for got, exp, name in zip(grads, torch.autograd.grad(want, list(oracle.values())), leaves):
        assert_close(got, exp, rtol=1e-10, name=name)


def test_dpo_bad_input():
    policy, ref, labels = make_pairs(torch.float64)
    with pytest.raises(ValueError, match="loss_type"):
        LinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="reference"):
        LinearDPOLoss()(policy["hidden"], policy["weight"], labels)
    with pytest.raises(ValueError, match="odd"):
        LinearDPOLoss()(policy["hidden"][:-1], policy["weight"], labels[:-1], ref_logps=torch.zeros(5))
    with pytest.raises(ValueError, match="ref_logps"):
        LinearDPOLoss()(policy["hidden"], policy["weight"], labels, ref_logps=torch.zeros(4))


@pytest.mark.parametrize("cls", [LinearSimPOLoss, LinearORPOLoss, LinearCPOLoss])
def test_reference_free_losses_refuse_a_reference(cls):
    """Given one (a call switched over from DPO), they would pay its vocab projection and ignore it."""
    policy, ref, labels = make_pairs(torch.float64)
    for given in ({k: ref[k] for k in ("ref_hidden", "ref_weight")}, {"ref_logps": torch.zeros(2 * P)}):
        with pytest.raises(ValueError, match="reference-free"):
            cls()(policy["hidden"], policy["weight"], labels, **given)


def expected_reference_free(fn, average, nll):
    """Oracle for SimPO / ORPO / CPO: the functional loss on float64 sequence log-probs."""
    def expected(policy, ref, labels, **kw):
        lp = token_logps(policy["hidden"], policy["weight"], policy["bias"], labels)
        lengths = (labels != -100).sum(-1)
        seq = lp.sum(-1) / lengths.clamp(min=1) if average(kw) else lp.sum(-1)
        args = (seq[:P], seq[P:])
        if nll(kw):  # token mean NLL over the chosen completions (TRL's nn.CrossEntropyLoss on the chosen)
            args += (-lp[:P].sum() / lengths[:P].sum(),)
        elif fn is cpo_loss:
            args += (None,)
        losses, metrics = fn(*args, **kw)
        return losses.mean(), dict(metrics, **{"logps/chosen": seq[:P].mean(), "logps/rejected": seq[P:].mean()})
    return expected


FREE_CASES = {
    "simpo": (LinearSimPOLoss, simpo_loss, lambda kw: True, lambda kw: False, dict(beta=2.0, gamma=0.3,
                                                                                  label_smoothing=0.1)),
    "orpo": (LinearORPOLoss, orpo_loss, lambda kw: True, lambda kw: True, dict(beta=0.2)),
    "cpo-sigmoid": (LinearCPOLoss, cpo_loss, lambda kw: False, lambda kw: True, dict(beta=0.1)),
    "cpo-simpo": (LinearCPOLoss, cpo_loss, lambda kw: True, lambda kw: True,
                  dict(loss_type="simpo", beta=2.0, simpo_gamma=0.4)),
    "cpo-hinge-noalpha": (LinearCPOLoss, cpo_loss, lambda kw: False, lambda kw: False,
                          dict(loss_type="hinge", cpo_alpha=0.0)),
    "cpo-ipo-alphapo": (LinearCPOLoss, cpo_loss, lambda kw: True, lambda kw: True,
                        dict(loss_type="ipo", alpha=0.3)),
}


@pytest.mark.parametrize("dtype,chunk_size", [(FP64, 9), (FP32, 20), (FP64, 4)], ids=["fp64-c9", "fp32-c20", "fp64-c4"])
@pytest.mark.parametrize("case", list(FREE_CASES))
def test_reference_free(case, dtype, chunk_size):
    cls, fn, average, nll, kw = FREE_CASES[case]
    check(cls(backend="chunked", chunk_size=chunk_size, **kw), expected_reference_free(fn, average, nll), dtype,
          "none", **kw)


# ---------------------------------------------------------------------------------------------
# a list of loss types with weights ("sft" among them), against TRL 1.16's DPOTrainer._compute_loss
# ---------------------------------------------------------------------------------------------
MIXES = {  # name: (loss types, weights, chunk size)
    "rpo": (["sigmoid", "sft"], [1.0, 0.5], 9),            # whole pairs per chunk: 3 projections
    "rpo-short-chunks": (["sigmoid", "sft"], [1.0, 0.5], 4),  # pairs longer than a chunk
    "mpo": (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 9),  # bco_pair couples the pairs: 4 projections
    "sft-only": (["sft"], None, 9),
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_dpo_loss_type_list_matches_trl(mix):
    from trl_standins import fake_lm, import_trl, trainer

    DPOTrainer = import_trl("trl", "DPOTrainer")
    types, weights, chunk_size = MIXES[mix]
    policy, ref, labels = make_pairs(FP64, seed=3)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    loss, metrics = LinearDPOLoss(loss_type=types, loss_weights=weights, bco_running_mean=0.0, backend="chunked",
                                  chunk_size=chunk_size)(leaves["hidden"], leaves["weight"], labels, leaves["bias"],
                                                         **ref)
    oracle = {k: v.detach().clone().requires_grad_() for k, v in policy.items()}
    per_token = token_logps(oracle["hidden"], oracle["weight"], oracle["bias"], labels)
    ref_seq = token_logps(ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"], labels).sum(-1)
    mask = (labels != -100).long()
    inputs = {"input_ids": torch.ones(2 * P, T + 1, dtype=torch.long), "attention_mask": torch.ones(2 * P, T + 1),
              "completion_mask": torch.cat([torch.zeros(2 * P, 1, dtype=torch.long), mask], dim=1),
              "ref_chosen_logps": ref_seq[:P], "ref_rejected_logps": ref_seq[P:]}
    me = trainer(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                 loss_types=types, loss_weights=weights or [1.0] * len(types), beta=0.1, label_smoothing=0.0,
                 use_weighting=False, args=type("Args", (), {"discopop_tau": 0.05})())
    want = DPOTrainer._compute_loss(me, fake_lm(per_token), inputs, False)
    assert_close(loss, want, rtol=1e-10, name="loss vs TRL")
    for (name, got), exp in zip(leaves.items(), torch.autograd.grad(want, list(oracle.values()))):
        assert_close(torch.autograd.grad(loss, leaves[name], retain_graph=True)[0], exp, rtol=1e-10, name=name)
    logged = me._metrics["eval"]
    for key in ("rewards/chosen", "rewards/rejected"):
        assert metrics[key].item() == pytest.approx(logged[key][0], rel=1e-6), key


def test_dpo_loss_type_list_bad_input():
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 loss types"):
        LinearDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_type='nope'"):
        LinearDPOLoss(loss_type=["sigmoid", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        LinearDPOLoss(loss_type=[])
