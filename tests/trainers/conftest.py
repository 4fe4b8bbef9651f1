"""Tiny model on disk, one thread per test process (2 shared cores: oversubscription is 40x slower)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from alignfast.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")
