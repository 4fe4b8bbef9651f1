"""Shared test setup: Triton's interpreter on CPU-only machines, NaN-poisoned allocations, one thread
for the model-training tests, the tiny model on disk."""
import os
from pathlib import Path

import torch

# Triton kernels run on CPU tensors only in its interpreter; this must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like / new_empty return NaN-filled float tensors, so an element a
    kernel forgot to write fails loudly instead of passing as whatever memory held."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    yield


# Tests that train tiny models run one torch thread each: on 2 shared cores oversubscription is ~40x slower.
ONE_THREAD_DIRS = {"data", "trainers", "demo"}
TESTS_DIR = Path(__file__).parent


@pytest.fixture(autouse=True)
def one_thread(request):
    if request.path.relative_to(TESTS_DIR).parts[0] not in ONE_THREAD_DIRS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved once per session (alignfast.models.tiny)."""
    from alignfast.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")
