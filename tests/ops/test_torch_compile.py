"""Inside torch.compile the public ops and the fused losses are opaque calls: a compiled model
around them gives eager's values and gradients, and a new token count does not recompile (tracing
their chunk loops specialised the graph on each batch's size, one recompile per new N)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import alignfast
from alignfast.losses import LinearDPOLoss, LinearSFTLoss

BACKENDS = [b for b in ("chunked", "cpp") if b in alignfast.backends("cpu")]
V, H = 40, 8
REF_W = torch.randn(V, H, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _heads(backend):
    return {
        "logprobs": lambda z, w, t: alignfast.linear_logprobs(z.flatten(0, 1), w, t.flatten(),
                                                              backend=backend).logprobs.sum(),
        "cross_entropy": lambda z, w, t: alignfast.linear_cross_entropy(z.flatten(0, 1), w, t.flatten(),
                                                                        backend=backend),
        "kl": lambda z, w, t: alignfast.linear_kl(z, w, z.detach(), REF_W, reduction="mean", backend=backend),
        "sft": lambda z, w, t: LinearSFTLoss(backend=backend)(z, w, t)[0],
        "dpo": lambda z, w, t: LinearDPOLoss(backend=backend)(z, w, t, ref_logps=torch.zeros(z.shape[0]))[0],
    }


@pytest.mark.parametrize("head", ["logprobs", "cross_entropy", "kl", "sft", "dpo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_around_a_fused_loss(head, backend):
    torch._dynamo.reset()
    loss_fn = _heads(backend)[head]
    lin = torch.nn.Linear(H, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)

    def step(x, t):
        return loss_fn(torch.tanh(lin(x)), weight, t)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, dynamic=True)
    frames = []
    for i, T in enumerate((5, 7, 9, 11)):
        g = torch.Generator().manual_seed(i)
        x, t = torch.randn(4, T, H, generator=g, dtype=torch.float64), torch.randint(0, V, (4, T), generator=g)
        t[:, 0] = -100
        got = compiled(x, t)
        got_grads = torch.autograd.grad(got, (weight, lin.weight))
        want = step(x, t)
        want_grads = torch.autograd.grad(want, (weight, lin.weight))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        frames.append(counter.frame_count)
    assert frames[1:] == frames[:1] * 3, f"recompiled for new token counts: frames {frames}"
