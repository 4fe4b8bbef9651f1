"""The native GAE reverse scan (`torch.ops.alignfast.gae_scan`) against the torch loop of
`alignfast.losses.gae`: masks with holes, fully masked rows, T=1, float32 and float64."""
import pytest
import torch
from helpers import assert_close

from alignfast import _native

pytestmark = pytest.mark.skipif(_native.extension() is None or not hasattr(torch.ops.alignfast, "gae_scan"),
                                reason="alignfast._C with gae_scan is not built")
gae_torch = pytest.importorskip("alignfast.losses.gae")._gae_torch

CASES = {"B4-T33-holes": (4, 33, 0.3), "B1-T1": (1, 1, 0.0), "B3-T200-dense": (3, 200, 0.0),
         "B130-T17-holes": (130, 17, 0.5), "B2-T9-all-masked": (2, 9, 1.0)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_loop(case, dtype):
    b, t, holes = CASES[case]
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(b, t, generator=g, dtype=dtype), torch.randn(b, t, generator=g, dtype=dtype)
    valid = torch.rand(b, t, generator=g) >= holes
    got = torch.ops.alignfast.gae_scan(rewards, values, valid, 0.99, 0.95)
    want = gae_torch(rewards, values, valid, 0.99, 0.95, dtype)
    for name, a, w in zip(("advantages", "returns"), got, want):
        assert a.dtype == dtype
        assert_close(a, w, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12 if dtype == torch.float64
                     else 1e-5, name=name)
        assert (a[~valid] == 0).all(), f"{name}: masked positions must be 0"


@pytest.mark.parametrize("bad, message", [
    (lambda r, v, m: (r[0], v[0], m[0]), "rewards must be 2-D"),
    (lambda r, v, m: (r, v[:, :-1], m), "values must have rewards' shape"),
    (lambda r, v, m: (r, v.double(), m), "values must have rewards' dtype"),
    (lambda r, v, m: (r, v, m.float()), "valid must be bool"),
    (lambda r, v, m: (r.long(), v.long(), m), "rewards must be float32 or float64"),
], ids=["1d", "shape", "dtype", "mask-dtype", "int"])
def test_bad_input(bad, message):
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.alignfast.gae_scan(*bad(r, v, m), 0.9, 0.9)


def test_gamma_out_of_range():
    r = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="gamma must lie in"):
        torch.ops.alignfast.gae_scan(r, r, r > 0, 1.5, 0.9)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    r, v = torch.randn(3, 8), torch.randn(3, 8)
    valid = torch.rand(3, 8) > 0.2

    def f(r, v, valid):
        adv, ret = torch.ops.alignfast.gae_scan(r, v, valid, 1.0, 0.95)
        return (adv - adv.mean()) / (adv.std() + 1e-8), ret

    for a, b in zip(torch.compile(f, fullgraph=True, backend="aot_eager")(r, v, valid), f(r, v, valid)):
        torch.testing.assert_close(a, b)
