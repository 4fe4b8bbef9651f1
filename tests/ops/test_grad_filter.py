"""grad_filter_eps: the backward skips the gradient products of vocab columns (tiles on triton) whose
every |dL/dz| is below eps. Checked against the exact float64 gradient: the error stays within what
the skipped elements can contribute, most of the vocabulary is skipped on peaked logits, a tiny eps
is exact, a huge one skips everything, and the forward never changes."""
import pytest
import torch
from helpers import assert_close

import alignfast
from alignfast.ops import chunked

BACKENDS = [b for b in alignfast.backends("cpu") if b != "reference"]


def peaked_case(n=48, h=16, v=1500, seed=0):
    """Trained-model-like logits: each hidden state points at its target's embedding, so the
    softmax puts nearly all its mass on a few tokens (fresh random data, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    hidden = 40.0 * weight[targets] + 0.3 * torch.randn(n, h, generator=g, dtype=torch.float64)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, targets, upstream


def grads(backend, hidden, weight, targets, upstream, dtype=torch.float64, **kw):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    out = alignfast.linear_logprobs(h, w, targets, backend=backend, **kw).logprobs
    gh, gw = torch.autograd.grad((out.double() * upstream).sum(), (h, w))
    return out.detach(), gh.double(), gw.double()


def exact_dz(hidden, weight, targets, upstream):
    """dL/dz of L = Σ upstream·logprob, from materialised float64 logits: g·(onehot − p)."""
    p = (hidden @ weight.t()).softmax(-1)
    return upstream[:, None] * (torch.nn.functional.one_hot(targets, weight.shape[0]).double() - p)


def fp64_backends():
    return [b for b in BACKENDS if b != "triton"]   # the interpreter runs triton here in fp32


@pytest.mark.parametrize("backend", fp64_backends())
def test_error_within_the_skipped_mass_and_most_columns_skipped(backend, monkeypatch):
    hidden, weight, targets, upstream = peaked_case()
    eps = 1e-6
    kept = []
    original = chunked._GradAccumulator._add_columns
    monkeypatch.setattr(chunked._GradAccumulator, "_add_columns",
                        lambda self, rows, cols, dz, k: (kept.append(k.numel()), original(self, rows, cols, dz, k))[1])
    _, gh_ref, gw_ref = grads("reference", hidden, weight, targets, upstream)
    out, gh, gw = grads(backend, hidden, weight, targets, upstream, grad_filter_eps=eps, chunk_size=16)

    v = weight.shape[0]
    assert kept and sum(kept) / (len(kept) * v) < 0.3, kept   # peaked: most of the vocabulary skipped
    # the skipped part of dz, exactly: the gradient error must be its products, within rounding
    dz = exact_dz(hidden, weight, targets, upstream)
    chunk_max = torch.stack([dz[i:i + 16].abs().amax(0) for i in range(0, len(dz), 16)])
    skipped = torch.cat([dz[i:i + 16] * (chunk_max[i // 16] < eps) for i in range(0, len(dz), 16)])
    assert skipped.abs().max() < eps and skipped.abs().max() > 0
    assert_close(gh, gh_ref - skipped @ weight, rtol=1e-9, name="grad_hidden")
    assert_close(gw, gw_ref - skipped.t() @ hidden, rtol=1e-9, name="grad_weight")
    # and the error is small next to the gradient itself
    assert (gh - gh_ref).abs().max() < 1e-3 * gh_ref.abs().max()
    exact_out, *_ = grads(backend, hidden, weight, targets, upstream, chunk_size=16)   # filtering leaves the
    torch.testing.assert_close(out, exact_out, rtol=0, atol=0)                          # forward bit for bit


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_eps_is_exact_and_huge_eps_skips_everything(backend):
    hidden, weight, targets, upstream = peaked_case(n=20, v=700, seed=1)
    dtype = torch.float32 if backend == "triton" else torch.float64
    _, gh_ref, gw_ref = grads(backend, hidden, weight, targets, upstream, dtype=dtype)
    _, gh, gw = grads(backend, hidden, weight, targets, upstream, dtype=dtype, grad_filter_eps=1e-300)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=0)
    _, gh, gw = grads(backend, hidden, weight, targets, upstream, dtype=dtype, grad_filter_eps=1e3)
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_triton_skips_tiles_within_the_bound():
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from alignfast.kernels import logprobs as K
    from alignfast.ops.options import LogitOptions

    hidden, weight, targets, upstream = peaked_case(n=32, v=2000, seed=2)
    _, gh_ref, gw_ref = grads("reference", hidden, weight, targets, upstream)
    h, w, g = hidden.float(), weight.float(), upstream.float()
    tiles = K.BlockConfig(block_n=4, block_v=64, block_h=16, num_warps=1, num_stages=1, group_n=2)

    def backward(eps):
        opts = LogitOptions(backend="triton", grad_filter_eps=eps)
        lse = K.forward(h, w, None, targets, opts, tiles).lse
        gh, gw, _ = K.backward(h, w, None, targets, lse, None, (g, None, None, None), opts, (True, True, False), tiles)
        return gh.double(), gw.double()

    eps = 1e-3
    gh, gw = backward(eps)
    gh_exact, gw_exact = backward(None)
    # a tile is skipped only when all its |dz| < eps: each gradient element loses < eps · Σ|factor|
    assert (gh - gh_ref).abs().max() <= eps * weight.abs().sum(0).max() + 1e-5 * gh_ref.abs().max()
    assert (gw - gw_ref).abs().max() <= eps * 4 * hidden.abs().max() + 1e-5 * gw_ref.abs().max()
    assert (gw - gw_exact).abs().max() > 0   # something was skipped
    # exactly the tiles whose every |dz| < eps are missing (float64 dz; fp32 rounding aside)
    dz = exact_dz(hidden, weight, targets, upstream)
    tile_max = dz.abs().view(8, 4, -1).amax(1)                               # [row blocks, V]
    tile_max = torch.nn.functional.pad(tile_max, (0, 48)).view(8, -1, 64).amax(2)   # [row blocks, V blocks]
    skipped_tiles = tile_max < eps
    assert skipped_tiles.float().mean() > 0.25
    keep = (~skipped_tiles).repeat_interleave(4, 0).repeat_interleave(64, 1)[:, :2000]
    skipped = dz * ~keep
    assert_close(gh, gh_ref - skipped @ weight, rtol=1e-4, name="grad_hidden")
    assert_close(gw, gw_ref - skipped.t() @ hidden, rtol=1e-4, name="grad_weight")


@pytest.mark.parametrize("backend", fp64_backends())
def test_cross_entropy_filters_its_fused_gradient(backend):
    hidden, weight, targets, _ = peaked_case(n=40, v=900, seed=3)
    h = hidden.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ weight.t(), targets)
    (g_ref,) = torch.autograd.grad(ref, h)
    h2 = hidden.clone().requires_grad_()
    loss = alignfast.linear_cross_entropy(h2, weight, targets, backend=backend, grad_filter_eps=1e-7)
    (g,) = torch.autograd.grad(loss, h2)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    # each token's gradient carries 1/N; dropped elements are < 1e-7 each
    assert 0 < (g - g_ref).abs().max() <= 1e-7 * weight.abs().sum(0).max()


@pytest.mark.parametrize("eps", [0, -1e-3, float("nan"), "1e-3", True])
def test_bad_eps_is_a_value_error(eps):
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        alignfast.linear_logprobs(h, w, torch.randint(0, 10, (4,)), grad_filter_eps=eps)


def test_reference_backend_refuses_the_filter():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="grad_filter_eps.*reference"):
        alignfast.linear_logprobs(h, w, torch.randint(0, 10, (4,)), backend="reference", grad_filter_eps=1e-6)


@pytest.mark.parametrize("module", ["LinearSFTLoss", "LinearDPOLoss"])
def test_fused_losses_pass_the_filter_to_the_policy_backward(module):
    hidden, weight, targets, _ = peaked_case(n=24, v=800, seed=4)
    h3, t3 = hidden.view(4, 6, -1), targets.view(4, 6)
    loss_cls = getattr(alignfast.losses, module)
    extra = {"ref_logps": torch.randn(4, dtype=torch.float64)} if module == "LinearDPOLoss" else {}

    def grad(**kw):
        h = h3.clone().requires_grad_()
        loss, _ = loss_cls(backend="chunked", **kw)(h, weight, t3, **extra)
        return loss.detach(), torch.autograd.grad(loss, h)[0]

    loss, g = grad()
    loss_tiny, g_tiny = grad(grad_filter_eps=1e-300)
    loss_huge, g_huge = grad(grad_filter_eps=1e3)
    torch.testing.assert_close(g_tiny, g, rtol=1e-12, atol=0)
    assert loss_huge == loss and g.abs().max() > 0 and g_huge.abs().max() == 0
