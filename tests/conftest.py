"""Shared fixtures: the real data beside the project, and small helpers."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real images and benchmark files); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the project on developer machines and CI)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test model is tiny: thread hand-offs cost more than the math (10-50x slower with 2 threads on a busy
    machine), and one thread also makes runs bitwise reproducible."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
