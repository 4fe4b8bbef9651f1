"""Every Triton launcher runs with its tensors' CUDA device current (Triton launches on the current one)."""
import contextlib
from types import SimpleNamespace

import torch

from alignfast.kernels import gae, kl, logprobs, pg_token_loss
from alignfast.kernels.launch_device import on_tensor_device


def test_the_launch_runs_under_the_first_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    launch = on_tensor_device(lambda first, x: (entered.copy(), x))
    assert launch(SimpleNamespace(is_cuda=True, device="cuda:1"), 5) == (["cuda:1"], 5)
    entered.clear()
    assert launch(torch.zeros(1), 6) == ([], 6)  # CPU tensors (the interpreter): nothing to switch


def test_every_public_launcher_is_guarded():
    launchers = [gae.gae_reverse_scan, kl.forward, kl.backward, logprobs.forward, logprobs.backward,
                 logprobs.forward_backward, pg_token_loss.pg_token_loss]
    assert all(f.__wrapped__ is not None for f in launchers)
    assert all(f.__code__ is on_tensor_device(lambda t: t).__code__ for f in launchers)
