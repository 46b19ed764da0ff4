import pytest
import torch

from lossd.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(device="cpu")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
