"""LinearPPOLoss and LinearGRPOLoss against their functional losses on materialised float64 log-probs."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import alignfast.ops.chunked as chunked
from alignfast import dispatch
from alignfast.losses._reductions import aggregate, masked_mean
from alignfast.losses.fused_rl import LinearGRPOLoss, LinearPPOLoss
from alignfast.losses.grpo import grpo_loss
from alignfast.losses.kl import token_kl
from alignfast.losses.ppo import ppo_policy_loss

B, T, H, V = 5, 6, 10, 43
FP64, FP32 = torch.float64, torch.float32


def token_stats(hidden, weight, bias, labels):
    """Oracle: float64 logits -> the targets' log-probs and the entropies, 0 at ignored positions."""
    logits = hidden.double() @ weight.double().t() + bias.double()
    valid = labels != -100
    logp = F.log_softmax(logits, -1)
    lp = logp.gather(-1, labels.where(valid, 0)[..., None]).squeeze(-1)
    return lp * valid, -(logp.exp() * logp).sum(-1) * valid


def make_rollout(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    labels = torch.randint(0, V, (B, T), generator=g)
    prompt = torch.tensor([2, 1, 3, 2, 4])
    labels[torch.arange(T) < prompt[:, None]] = -100
    labels[1, -2:] = -100
    policy = dict(hidden=rnd(B, T, H), weight=rnd(V, H, scale=H**-0.5), bias=rnd(V))
    ref = dict(ref_hidden=rnd(B, T, H), ref_weight=rnd(V, H, scale=H**-0.5), ref_bias=rnd(V))
    lp, _ = token_stats(*policy.values(), labels)
    old = (lp + rnd(B, T, scale=0.3).double()).to(dtype)  # ratios on both sides of the clip range
    return policy, ref, labels, dict(old_logprobs=old, advantages_tok=rnd(B, T), advantages_seq=rnd(B))


def ref_inputs(mode, ref, labels):
    if mode == "hidden":
        return ref
    return dict(ref_logps=token_stats(*ref.values(), labels)[0].to(ref["ref_hidden"].dtype))


def run(module, call, expected, dtype, ref_mode, rtol_metrics=None):
    policy, ref, labels, extra = make_rollout(dtype)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    loss, metrics = call(module, leaves, labels, extra, ref_inputs(ref_mode, ref, labels))
    oracle = {k: v.detach().double().requires_grad_() for k, v in policy.items()}
    lp, ent = token_stats(*oracle.values(), labels)
    rlp, _ = token_stats(*(v.double() for v in ref.values()), labels)
    want, want_metrics = expected(lp, ent, rlp, labels != -100, {k: v.double() for k, v in extra.items()})
    rtol = 1e-10 if dtype == FP64 else 1e-5
    assert_close(loss, want, rtol=rtol, name="loss")
    for got, exp, name in zip(torch.autograd.grad(loss, list(leaves.values())),
                              torch.autograd.grad(want, list(oracle.values())), leaves):
        assert_close(got, exp, rtol=rtol, name=name)
    for name, value in want_metrics.items():
        assert_close(metrics[name], value, rtol=rtol, atol=rtol, name=name)


PPO_CASES = {
    "token-mean-kl-ent": dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01),
    "seq-mean-token-sum-dual": dict(loss_agg="seq-mean-token-sum", dual_clip=3.0, kl_coef=0.05),
    "seq-mean-token-mean-high": dict(loss_agg="seq-mean-token-mean", clip_eps_high=0.28, entropy_coef=0.02),
}
SETTINGS = ([(c, "hidden", FP64, 7) for c in PPO_CASES] + [(c, "token", FP64, 12) for c in PPO_CASES]
            + [("token-mean-kl-ent", "hidden", FP32, 12), ("token-mean-kl-ent", "token", FP64, 2),
               ("seq-mean-token-sum-dual", "hidden", FP64, 3)])  # per-sequence: sequences longer than a chunk
IDS = [f"{c}-{m}-{'fp64' if d == FP64 else 'fp32'}-c{n}" for c, m, d, n in SETTINGS]


@pytest.mark.parametrize("case,ref_mode,dtype,chunk_size", SETTINGS, ids=IDS)
def test_ppo(case, ref_mode, dtype, chunk_size):
    kw = PPO_CASES[case]
    agg = kw.get("loss_agg", "token-mean")
    pg_kw = {k: v for k, v in kw.items() if k in ("clip_eps_high", "dual_clip", "loss_agg")}

    def call(module, leaves, labels, extra, refs):
        return module(leaves["hidden"], leaves["weight"], labels, extra["old_logprobs"], extra["advantages_tok"],
                      leaves["bias"], **refs)

    def expected(lp, ent, rlp, mask, extra):
        loss, metrics = ppo_policy_loss(lp, extra["old_logprobs"], extra["advantages_tok"], mask, **pg_kw)
        kl = token_kl(lp, rlp, kw.get("kl_estimator", "k1"))
        total = (loss + kw.get("kl_coef", 0.0) * aggregate(kl, mask, agg)
                 - kw.get("entropy_coef", 0.0) * aggregate(ent, mask, agg))
        return total, dict(metrics, policy_loss=loss, kl=masked_mean(kl, mask), entropy=masked_mean(ent, mask))

    run(LinearPPOLoss(backend="chunked", chunk_size=chunk_size, **kw), call, expected, dtype, ref_mode)


GRPO_CASES = {
    "dapo": dict(loss_type="dapo", beta=0.04),
    "grpo": dict(loss_type="grpo", beta=0.1, epsilon_high=0.28),
    "bnpo-noref": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", beta=0.02, max_completion_length=8),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, delta=1.5),
    "gspo-dapo": dict(loss_type="dapo", importance_sampling_level="sequence"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=False),
    "cispo": dict(loss_type="cispo", epsilon_high=2.0, beta=0.04),
    "sapo": dict(loss_type="sapo", sapo_temperature_neg=1.2),
    "dapo-delta": dict(loss_type="dapo", delta=1.3, beta=0.04),
}
GSETTINGS = ([(c, "hidden", FP64, 7) for c in GRPO_CASES] + [(c, "token", FP32, 12) for c in ("dapo", "grpo")]
             + [(c, "hidden", FP64, 2) for c in GRPO_CASES])  # chunks shorter than every sequence
GIDS = [f"{c}-{m}-{'fp64' if d == FP64 else 'fp32'}-c{n}" for c, m, d, n in GSETTINGS]


@pytest.mark.parametrize("on_policy", [False, True], ids=["old", "on-policy"])
@pytest.mark.parametrize("case,ref_mode,dtype,chunk_size", GSETTINGS, ids=GIDS)
def test_grpo(case, ref_mode, dtype, chunk_size, on_policy):
    kw = GRPO_CASES[case]
    use_ref = kw.get("beta", 0.0) > 0

    def call(module, leaves, labels, extra, refs):
        return module(leaves["hidden"], leaves["weight"], labels, extra["advantages_seq"], leaves["bias"],
                      old_logprobs=None if on_policy else extra["old_logprobs"], **(refs if use_ref else {}))

    def expected(lp, ent, rlp, mask, extra):
        loss, metrics = grpo_loss(lp, None if on_policy else extra["old_logprobs"], rlp if use_ref else None,
                                  extra["advantages_seq"], mask, **kw)
        return loss, dict(metrics, entropy=masked_mean(ent, mask))

    run(LinearGRPOLoss(backend="chunked", chunk_size=chunk_size, **kw), call, expected, dtype, ref_mode)


PRODUCTS = [(torch, "mm"), (torch.Tensor, "addmm_")]  # the gradient products (grad_hidden, grad_weight)


def count_calls(monkeypatch, targets: dict) -> dict:
    """{key: [(owner, attribute), ...]} -> counts of the calls to each key's functions, as they happen."""
    counts = dict.fromkeys(targets, 0)

    def counted(real, key):
        def f(*a, **k):
            counts[key] += 1
            return real(*a, **k)
        return f

    for key, places in targets.items():
        for owner, name in places:
            monkeypatch.setattr(owner, name, counted(getattr(owner, name), key))
    return counts


def test_grpo_three_projections(monkeypatch):
    policy, ref, labels, extra = make_rollout(FP64)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    counts = count_calls(monkeypatch, {"blocks": [(chunked, "logits_block")], "products": PRODUCTS})
    loss, _ = LinearGRPOLoss(backend="chunked", chunk_size=7, beta=0.1)(
        leaves["hidden"], leaves["weight"], labels, extra["advantages_seq"], leaves["bias"], **ref_inputs("token", ref, labels))
    loss.backward()
    assert counts["products"] == 2 * counts["blocks"] and counts["blocks"] > 1  # 3 projections per chunk


@pytest.mark.parametrize("loss_type,level,split", [
    ("dapo", "token", True), ("bnpo", "token", True), ("cispo", "token", True), ("grpo", "token", False),
    ("dr_grpo", "token", False), ("luspo", "token", False), ("sapo", "token", False), ("dapo", "sequence", False)])
def test_grpo_token_means_split_long_completions(monkeypatch, loss_type, level, split):
    """Chunks of 3 tokens, completions of up to 4: a loss that is a token sum with a batch-wide normaliser
    (dapo, bnpo, cispo) splits a completion between chunks, 3 projections per row; a per-sequence one (grpo,
    dr_grpo, luspo, sapo; any with GSPO's per-sequence ρ) takes a statistics pass for a completion's rows
    past its first chunk."""
    policy, ref, labels, extra = make_rollout(FP64)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    counts = count_calls(monkeypatch, {"blocks": [(chunked, "logits_block")], "products": PRODUCTS})
    loss, _ = LinearGRPOLoss(backend="chunked", chunk_size=3, loss_type=loss_type, importance_sampling_level=level)(
        leaves["hidden"], leaves["weight"], labels, extra["advantages_seq"], leaves["bias"])
    loss.backward()
    lengths = (labels != -100).sum(-1).tolist()
    grad_blocks = counts["products"] // 2
    if split:
        assert grad_blocks == counts["blocks"] == -(-sum(lengths) // 3)
    else:
        assert counts["blocks"] - grad_blocks == sum(1 for n in lengths if n > 3) > 0


def test_bad_input():
    policy, ref, labels, extra = make_rollout(FP64)
    with pytest.raises(ValueError, match="reference"):
        LinearGRPOLoss(beta=0.1)(policy["hidden"], policy["weight"], labels, extra["advantages_seq"])
    with pytest.raises(ValueError, match="loss_type"):
        LinearGRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match=r"delta must be >= 1 \+ epsilon_high"):
        LinearGRPOLoss(delta=1.1, epsilon_high=0.28)
    with pytest.raises(ValueError, match="delta .*clipped loss types"):
        LinearGRPOLoss(loss_type="cispo", delta=2.0)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        LinearGRPOLoss(importance_sampling_level="token-mean")
    with pytest.raises(ValueError, match="ref_logps"):
        LinearPPOLoss(kl_coef=0.1)(policy["hidden"], policy["weight"], labels, extra["old_logprobs"],
                                   extra["advantages_tok"], ref_logps=torch.zeros(B))


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_per_sequence_inputs_must_match_the_batch(backend):
    """The fused path takes each chunk's rows of old_logprobs / advantages: a batch size that disagrees with
    labels' must be an error up front, not an index error or other rows read silently."""
    policy, _, labels, extra = make_rollout(FP64)
    h, w = policy["hidden"], policy["weight"]
    old, adv_tok, adv_seq = extra["old_logprobs"], extra["advantages_tok"], extra["advantages_seq"]
    ppo, grpo = LinearPPOLoss(backend=backend), LinearGRPOLoss(backend=backend)
    with pytest.raises(ValueError, match=r"old_logprobs must be \[B, T\]"):
        ppo(h, w, labels, old[:-1], adv_tok)
    with pytest.raises(ValueError, match=r"advantages must be \[B, T\]=.* or \[B\]="):
        ppo(h, w, labels, old, adv_tok[:, :-1])
    with pytest.raises(ValueError, match=r"advantages must be .*got shape \(%d,\)" % (B + 1)):
        grpo(h, w, labels, torch.cat([adv_seq, adv_seq[:1]]))
    with pytest.raises(ValueError, match=r"old_logprobs must be \[B, T\]"):
        grpo(h, w, labels, adv_seq, old_logprobs=old[:, :-1])
    with pytest.raises(ValueError, match="advantages must be float"):
        grpo(h, w, labels, torch.ones(B, dtype=torch.long))


def full_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels):
    """Oracle: KL(π‖π_ref) per token over the whole vocabulary, from float64 logits; 0 at ignored positions."""
    logp = F.log_softmax(hidden.double() @ weight.double().t() + bias.double(), -1)
    logq = F.log_softmax(ref_hidden.double() @ ref_weight.double().t() + ref_bias.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1) * (labels != -100)


FULL_SETTINGS = [("token-mean", FP64, "chunked", 0.5), ("seq-mean-token-sum", FP64, "chunked", 0.2),
                 ("seq-mean-token-mean", FP64, "cpp", 0.3), ("token-mean", FP32, "chunked", 0.5),
                 ("token-mean", FP64, "chunked", 0.0), ("token-mean", FP64, "cpp", 0.5),
                 ("seq-mean-token-sum", FP32, "cpp", 0.2)]


@pytest.mark.parametrize("agg,dtype,backend,kl_coef", FULL_SETTINGS,
                         ids=[f"{a}-{'fp64' if d == FP64 else 'fp32'}-{b}-kl{c}" for a, d, b, c in FULL_SETTINGS])
def test_ppo_full_vocab_kl(agg, dtype, backend, kl_coef):
    if backend not in dispatch.backends("cpu"):
        pytest.skip(f"backend {backend!r} is not built here")
    policy, ref, labels, extra = make_rollout(dtype)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    module = LinearPPOLoss(kl_estimator="full", kl_coef=kl_coef, loss_agg=agg, backend=backend, chunk_size=7)
    loss, metrics = module(leaves["hidden"], leaves["weight"], labels, extra["old_logprobs"], extra["advantages_tok"],
                           leaves["bias"], **ref)

    oracle = {k: v.detach().double().requires_grad_() for k, v in policy.items()}
    lp, _ = token_stats(*oracle.values(), labels)
    mask = labels != -100
    kl = full_kl(*oracle.values(), *ref.values(), labels)
    pg, _ = ppo_policy_loss(lp, extra["old_logprobs"].double(), extra["advantages_tok"].double(), mask,
                            loss_agg=agg, backend="torch")
    want = pg + kl_coef * aggregate(kl, mask.double(), agg)
    rtol = 1e-10 if dtype == FP64 else 1e-5
    assert_close(loss, want, rtol=rtol, name="loss")
    for got, exp, name in zip(torch.autograd.grad(loss, list(leaves.values())),
                              torch.autograd.grad(want, list(oracle.values())), leaves):
        assert_close(got, exp, rtol=rtol, name=name)
    assert_close(metrics["kl"], masked_mean(kl, mask.double()), rtol=rtol, name="kl metric")
    assert_close(metrics["policy_loss"], pg, rtol=rtol, name="policy_loss metric")


FUSED_KL_CASES = {  # chunk size, loss_agg
    "whole-sequences": (7, "token-mean"),
    "split-sequences": (3, "token-mean"),            # a token mean: a sequence may end in the next chunk
    "longer-than-a-chunk": (3, "seq-mean-token-mean"),  # a sequence mean: its rows past a chunk, a stats pass
}


@pytest.mark.skipif("cpp" not in dispatch.backends("cpu"), reason="alignfast._C is not built")
@pytest.mark.parametrize("case", list(FUSED_KL_CASES))
def test_ppo_full_vocab_kl_rides_along_the_policy_pass(monkeypatch, case):
    """cpp: the KL penalty is formed from the policy pass's own logits blocks, beside a reference block
    of the same rows: 4 vocab projections per row (policy, reference, grad_hidden, grad_weight; one more
    policy projection for the rows of a sequence past its first chunk, where the loss is per sequence),
    not 3 + 4 in a separate pass."""
    from alignfast.ops import kl as kl_ops

    chunk_size, agg = FUSED_KL_CASES[case]
    policy, ref, labels, extra = make_rollout(FP64)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    counts = count_calls(monkeypatch, {"policy": [(chunked, "logits_block")], "ref": [(kl_ops, "logits_block")],
                                       "products": PRODUCTS})
    module = LinearPPOLoss(kl_estimator="full", kl_coef=0.3, loss_agg=agg, backend="cpp", chunk_size=chunk_size)
    loss, metrics = module(leaves["hidden"], leaves["weight"], labels, extra["old_logprobs"], extra["advantages_tok"],
                           leaves["bias"], **ref)
    got = torch.autograd.grad(loss, list(leaves.values()))
    lengths = (labels != -100).sum(-1).tolist()
    grad_blocks = {"whole-sequences": counts["ref"], "split-sequences": -(-sum(lengths) // chunk_size),
                   "longer-than-a-chunk": sum(-(-n // chunk_size) for n in lengths)}[case]
    assert counts["ref"] == grad_blocks > 1 and counts["products"] == 2 * grad_blocks  # one of each per block
    stats_only = counts["policy"] - grad_blocks  # the rows past a sequence's first chunk: a statistics pass
    assert stats_only == (sum(1 for n in lengths if n > chunk_size) if case == "longer-than-a-chunk" else 0)

    oracle = {k: v.detach().requires_grad_() for k, v in policy.items()}
    lp, _ = token_stats(*oracle.values(), labels)
    mask = labels != -100
    kl = full_kl(*oracle.values(), *ref.values(), labels)
    want = ppo_policy_loss(lp, extra["old_logprobs"], extra["advantages_tok"], mask, loss_agg=agg, backend="torch")[0] \
        + 0.3 * aggregate(kl, mask.double(), agg)
    assert_close(loss, want, rtol=1e-10, name="loss")
    for a, e, name in zip(got, torch.autograd.grad(want, list(oracle.values())), leaves):
        assert_close(a, e, rtol=1e-10, name=name)
    assert_close(metrics["kl"], masked_mean(kl, mask.double()), rtol=1e-10, name="kl metric")


@pytest.mark.skipif("cpp" not in dispatch.backends("cpu"), reason="alignfast._C is not built")
def test_grad_filter_eps_leaves_the_full_kl_gradient_exact():
    """grad_filter_eps thins the policy's own gradient; carried in the same blocks, the KL's was thinned too
    (the filter saw their sum), so it is not carried then. Zero advantages: the gradient is the KL's alone."""
    policy, ref, labels, extra = make_rollout(FP64)
    leaves = {k: v.requires_grad_() for k, v in policy.items()}
    module = LinearPPOLoss(kl_estimator="full", kl_coef=0.3, backend="cpp", chunk_size=7, grad_filter_eps=1e-3)
    loss, _ = module(leaves["hidden"], leaves["weight"], labels, extra["old_logprobs"],
                     torch.zeros_like(extra["advantages_tok"]), leaves["bias"], **ref)
    oracle = {k: v.detach().requires_grad_() for k, v in policy.items()}
    want = 0.3 * masked_mean(full_kl(*oracle.values(), *ref.values(), labels), (labels != -100).double())
    for a, e, name in zip(torch.autograd.grad(loss, list(leaves.values())),
                          torch.autograd.grad(want, list(oracle.values())), leaves):
        assert_close(a, e, rtol=1e-10, name=name)


def test_ppo_full_vocab_kl_needs_reference_heads():
    policy, ref, labels, extra = make_rollout(FP64)
    args = (policy["hidden"], policy["weight"], labels, extra["old_logprobs"], extra["advantages_tok"])
    full = LinearPPOLoss(kl_estimator="full", kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight"):
        full(*args)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight.*ref_logps"):
        full(*args, ref_logps=token_stats(*ref.values(), labels)[0])
    with pytest.raises(ValueError, match="ref_hidden and ref_weight"):
        full(*args, ref_hidden=ref["ref_hidden"])
    with pytest.raises(ValueError, match="softcap"):
        LinearPPOLoss(kl_estimator="full", softcap=30.0)
    with pytest.raises(ValueError, match="kl_estimator='k4'.*'full'"):
        LinearPPOLoss(kl_estimator="k4")
