"""Test helpers shared by every test module (importable as `helpers`: tests/ is on sys.path)."""
import torch


def assert_close(actual, expected, *, rtol, atol=None, name=""):
    """torch.testing.assert_close with a scale-relative atol and a report of where they differ."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN at {torch.isnan(actual).nonzero()[:5].tolist()}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = rtol * max(scale, 1e-12) if atol is None else atol
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; max abs err "
                             f"{err.max().item():.3e} (atol {atol:.3e}, rtol {rtol}); first at {idx}: "
                             f"actual {actual[bad][:5].tolist()} expected {expected[bad][:5].tolist()}")


def max_err(actual, expected):
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
