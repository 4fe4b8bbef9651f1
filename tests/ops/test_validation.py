"""Bad input to the public ops: a clear ValueError/TypeError/RuntimeError naming the argument."""
import math

import pytest
import torch

import alignfast
from alignfast.dispatch import resolve

H, V = 8, 20


def args(**over):
    a = dict(hidden=torch.randn(5, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (5,)))
    a.update(over)
    return a


BAD = {
    "mismatched-H": (args(weight=torch.randn(V, H + 1)), ValueError, r"disagree on H"),
    "targets-shape": (args(targets=torch.randint(0, V, (6,))), ValueError, r"targets shape \(6,\)"),
    "no-features": (args(hidden=torch.randn(5, 0), weight=torch.randn(V, 0)), ValueError, r"no features \(H=0\)"),
    "empty-vocab": (args(weight=torch.randn(0, H), targets=torch.full((5,), -100)), ValueError, r"empty vocabulary"),
    "weight-not-2d": (args(weight=torch.randn(V, H, 1)), ValueError, r"weight must be 2-D"),
    "hidden-1d": (args(hidden=torch.randn(H)), ValueError, r"hidden must be"),
    "float-targets": (args(targets=torch.rand(5)), ValueError, r"targets must be an int64 \(or int32\) tensor"),
    "target-too-big": (args(targets=torch.tensor([0, 1, V, 2, 3])), ValueError, r"outside \[0, V=20\)"),
    "target-negative": (args(targets=torch.tensor([0, -1, 2, 2, 3])), ValueError, r"holds -1"),
    "mixed-dtypes": (args(weight=torch.randn(V, H, dtype=torch.float64)), ValueError, r"same dtype"),
    "int-hidden": (args(hidden=torch.ones(5, H, dtype=torch.int64)), ValueError, r"hidden must be float"),
    "bias-shape": (args(bias=torch.randn(V + 1)), ValueError, r"bias must be \[V\]=20"),
    "not-a-tensor": (args(hidden=[[1.0] * H]), TypeError, r"hidden must be a torch.Tensor"),
    "temperature-0": (args(temperature=0.0), ValueError, r"temperature"),
    "temperature-nan": (args(temperature=float("nan")), ValueError, r"temperature"),
    "temperature-denormal": (args(temperature=1e-45), ValueError, r"1/temperature must fit in float32"),
    "softcap-neg": (args(softcap=-1.0), ValueError, r"softcap"),
    "chunk-0": (args(chunk_size=0), ValueError, r"chunk_size"),
    "unknown-backend": (args(backend="magic"), ValueError, r"backend='magic' is unknown.*reference"),
    "int16-targets": (args(targets=torch.randint(0, V, (5,), dtype=torch.int16)), ValueError, r"int64 \(or int32\)"),
    "uint8-targets": (args(targets=torch.randint(0, V, (5,), dtype=torch.uint8)), ValueError, r"int64 \(or int32\)"),
    "bias-dtype": (args(bias=torch.randn(V, dtype=torch.float64)), ValueError, r"bias \(torch.float64\).*same dtype"),
    "bias-minus-inf": (args(bias=torch.zeros(V).index_fill_(0, torch.tensor([3]), -math.inf)), ValueError,
                       r"bias \(shape \(20,\)\) must be finite"),
    # finfo.min / -1e38 masks: log p ~ b/T times the entropy's gradient overflowed, then met p = 0 (NaN)
    "bias-finfo-min": (args(bias=torch.zeros(V).index_fill_(0, torch.tensor([3]), torch.finfo(torch.float32).min)),
                       ValueError, r"\|entries\| < 1e\+30.*-1e4"),
    "ignore-index-overflow": (args(ignore_index=10**20), ValueError, r"ignore_index must be an int"),
    # int32 targets compared with 2**32 wrapped it to 0: every target 0 was taken as ignored
    "ignore-index-beyond-int32": (args(targets=torch.tensor([0, 1, 0, 5, 3], dtype=torch.int32), ignore_index=2**32),
                                  ValueError, r"ignore_index=4294967296 does not fit targets's dtype torch.int32"),
    "softcap-beyond-float32": (args(softcap=1e39), ValueError, r"softcap=1e\+39 is out of range"),
    "meta-tensors": (args(hidden=torch.randn(5, H, device="meta"), weight=torch.randn(V, H, device="meta"),
                          targets=torch.zeros(5, dtype=torch.long, device="meta")), ValueError, r"meta tensor"),
    "chunks-env": (args(_env="1e6"), ValueError, r"ALIGNFAST_CHUNK_BYTES must be a whole number"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("op", ["linear_logprobs", "linear_cross_entropy"])
def test_bad_input_raises_clear_error(op, case, monkeypatch):
    kwargs, err, match = BAD[case]
    kwargs = dict(kwargs)
    if "_env" in kwargs:
        monkeypatch.setenv("ALIGNFAST_CHUNK_BYTES", kwargs.pop("_env"))
    fn = getattr(alignfast, op)
    with pytest.raises(err, match=match):
        fn(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"), **kwargs)


@pytest.mark.parametrize("backend", ["reference", "chunked"] + (["cpp"] if "cpp" in alignfast.backends() else []))
@pytest.mark.parametrize("op", ["linear_logprobs", "linear_cross_entropy"])
def test_int32_targets_and_numpy_scalars_are_accepted(op, backend):
    """int32 token ids (some collators' dtype) and numpy scalar options give int64/float results."""
    np = pytest.importorskip("numpy")
    a = args(weight=torch.randn(V, H, dtype=torch.float64), hidden=torch.randn(5, H, dtype=torch.float64))
    fn = getattr(alignfast, op)
    want = fn(a["hidden"], a["weight"], a["targets"], temperature=0.7, backend="reference")
    got = fn(a["hidden"], a["weight"], a["targets"].int(), temperature=np.float32(0.7), chunk_size=np.int64(2),
             ignore_index=np.int64(-100), backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)  # 0.7 as np.float32 is 0.7 rounded to fp32


def test_ignore_index_is_not_out_of_range():
    out = alignfast.linear_logprobs(**args(targets=torch.tensor([0, -100, 2, -100, 3])))
    assert (out.logprobs[[1, 3]] == 0).all()


def test_unavailable_backend_lists_available():
    with pytest.raises(RuntimeError, match=r"not available.*available: \["):
        resolve("cuda", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="is on"):
        alignfast.linear_logprobs(torch.randn(5, H).cuda(), torch.randn(V, H), torch.randint(0, V, (5,)))


def test_targets_on_other_device_is_reported(monkeypatch):
    # A CPU-only machine cannot make a second real device; the meta device stands in for one.
    with pytest.raises(ValueError, match="is on"):
        alignfast.linear_logprobs(torch.randn(5, H), torch.randn(V, H), torch.randint(0, V, (5,), device="meta"))


@pytest.mark.parametrize("backend", ["reference", "chunked"] + (["cpp"] if "cpp" in alignfast.backends() else []))
def test_truthy_flags_act_as_bools_on_every_backend(backend):
    """A truthy non-bool return_entropy reached the C++ schema as is (an opaque RuntimeError on cpp only)."""
    a = args()
    got = alignfast.linear_logprobs(a["hidden"], a["weight"], a["targets"], return_entropy=1, backend=backend)
    want = alignfast.linear_logprobs(a["hidden"], a["weight"], a["targets"], return_entropy=True, backend="reference")
    torch.testing.assert_close(got.entropy, want.entropy)
