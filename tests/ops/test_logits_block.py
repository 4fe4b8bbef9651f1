"""`logits_block` in both layouts: the vocab-major block (the transpose of W·hᵀ, which the `cpp`
backend's token chunks use) holds the same logits as the row-major one, in the caller's buffer."""
import pytest
import torch
from helpers import assert_close

from alignfast.ops.chunked import logits_block


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("vocab_major", [False, True], ids=["row-major", "vocab-major"])
def test_logits_block_layouts(vocab_major, with_bias, dtype):
    g = torch.Generator().manual_seed(3)
    hidden, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                            ((19, 24), (45, 24), (45,)))
    want = hidden @ weight.t() + (bias if with_bias else 0)
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    buf = torch.full((19 * 45 + 7,), float("nan"), dtype=cdtype)
    z = logits_block(hidden.to(dtype), weight.to(dtype), bias.to(dtype) if with_bias else None, out=buf,
                     vocab_major=vocab_major)
    assert z.shape == (19, 45) and z.dtype == cdtype
    assert z.data_ptr() == buf.data_ptr(), "the block must be written into the caller's buffer"
    assert z.stride() == ((1, 19) if vocab_major else (45, 1))
    assert torch.isnan(buf[19 * 45:]).all(), "nothing past the block's elements"
    tol = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert_close(z.double(), want, rtol=tol, atol=tol * want.abs().max().item(), name="logits")
    # without a buffer: a fresh block, the same layout
    fresh = logits_block(hidden.to(dtype), weight.to(dtype), None, vocab_major=vocab_major)
    assert fresh.dtype == cdtype and fresh.stride() == ((1, 19) if vocab_major else (45, 1))
