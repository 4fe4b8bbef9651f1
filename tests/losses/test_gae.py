"""gae (torch loop and Triton kernel) against a textbook float64 GAE run on each row's valid tokens."""
import os

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import assert_close  # noqa: E402

from alignfast import dispatch  # noqa: E402
from alignfast.losses import gae  # noqa: E402
from alignfast.losses.gae import _has_native_scan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = (["torch"] + (["triton"] if "triton" in dispatch.backends(DEVICE) else [])
            + ([{"cpu": "cpp", "cuda": "cuda"}[DEVICE]] if _has_native_scan(torch.device(DEVICE)) else []))


def reference(rewards, values, mask, gamma, lam):
    """Plain GAE on the compressed sequence of each row's valid positions, scattered back (0 elsewhere)."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx] + [0.0]  # V past the last valid token is 0
        a_next = 0.0
        for k in reversed(range(len(idx))):
            delta = r[k] + gamma * v[k + 1] - v[k]
            a_next = delta + gamma * lam * a_next
            adv[b][idx[k]] = a_next
            ret[b][idx[k]] = a_next + v[k]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def make_mask(kind, B, T, g):
    if kind == "right-padded":
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        return torch.arange(T)[None, :] < lengths[:, None]
    if kind == "holes":  # e.g. tool-output tokens inside a response
        return torch.rand(B, T, generator=g) < 0.7
    if kind == "one-row-masked":
        mask = torch.rand(B, T, generator=g) < 0.8
        mask[B // 2] = False
        return mask
    if kind == "all-masked":
        return torch.zeros(B, T, dtype=torch.bool)
    return torch.ones(B, T, dtype=torch.bool)


CASES = {
    "B4-T13-right-padded": (4, 13, "right-padded", 1.0, 0.95),
    "B3-T17-holes-g0.99-l0.9": (3, 17, "holes", 0.99, 0.9),
    "B5-T9-one-row-masked": (5, 9, "one-row-masked", 1.0, 0.95),
    "B2-T6-all-masked": (2, 6, "all-masked", 1.0, 0.95),
    "B1-T31-full": (1, 31, "full", 0.97, 1.0),
    "B1-T1-full": (1, 1, "full", 1.0, 0.95),
    "B3-T1-right-padded-l0": (3, 1, "right-padded", 0.9, 0.0),
    "B6-T8-holes-g0": (6, 8, "holes", 0.0, 0.95),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype, backend, poison_empty):
    B, T, kind, gamma, lam = CASES[case]
    g = torch.Generator().manual_seed(B * 100 + T)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = make_mask(kind, B, T, g)
    exp_adv, exp_ret = reference(rewards, values, mask, gamma, lam)
    adv, ret = gae(rewards.to(dtype).to(DEVICE), values.to(dtype).to(DEVICE), mask.to(DEVICE),
                   gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == dtype and ret.dtype == dtype
    # float64: exact recursion; float32: what a float32 accumulation over T steps achieves.
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(adv, exp_adv, rtol=rtol, name=f"{case} advantages")
    assert_close(ret, exp_ret, rtol=rtol, name=f"{case} returns")
    assert (adv.cpu()[~mask] == 0).all() and (ret.cpu()[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_and_half_inputs(backend):
    g = torch.Generator().manual_seed(7)
    rewards, values = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    mask = (torch.rand(3, 10, generator=g) < 0.6)
    exp_adv, exp_ret = reference(rewards.bfloat16().double(), values.bfloat16().double(), mask, 1.0, 0.95)
    adv, ret = gae(rewards.bfloat16().to(DEVICE), values.bfloat16().to(DEVICE), mask.float().to(DEVICE),
                   backend=backend)
    assert adv.dtype == torch.float32  # accumulated and returned in fp32
    assert_close(adv, exp_adv, rtol=1e-5, name="advantages")
    assert_close(ret, exp_ret, rtol=1e-5, name="returns")


def test_no_gradient_flows():
    rewards = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    adv, ret = gae(rewards, values, torch.ones(2, 5, dtype=torch.bool), backend="torch")
    assert not adv.requires_grad and not ret.requires_grad


def test_auto_on_cpu_is_the_native_scan_when_built():
    from alignfast.losses.gae import _has_native_scan, _resolve

    expected = "cpp" if _has_native_scan(torch.device("cpu")) else "torch"
    assert _resolve("auto", torch.device("cpu")) == expected


def test_validation():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"values \(2, 4\).*rewards \(2, 5\)"):
        gae(r, torch.randn(2, 4), m)
    with pytest.raises(ValueError, match=r"mask \(2, 4\).*rewards \(2, 5\)"):
        gae(r, v, torch.ones(2, 4))
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        gae(torch.randn(5), torch.randn(5), torch.ones(5))
    with pytest.raises(ValueError, match="gamma"):
        gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(r, v, m, lam=-0.1)
    with pytest.raises(ValueError, match="backend='gpu'.*'auto', 'torch', 'triton'"):
        gae(r, v, m, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available for cpu tensors"):
        gae(r, v, m, backend="cuda")
