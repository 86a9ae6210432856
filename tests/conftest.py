"""Shared pytest set-up: hypothesis profiles and the repository root on sys.path.

Profiles: `dev` (default) has no deadline; `ci` (selected when the environment variable CI is
set) is also derandomized so a CI run is reproducible.
"""
import os
import sys

import pytest
import torch
from hypothesis import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

settings.register_profile("dev", deadline=None, max_examples=25)
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def one_thread():
    """One torch thread during a test (the toy model's last bits depend on the threads), then
    the previous count. Modules use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_face_model():
    """The `tiny` preset's face model, built with one torch thread (the toy model's bases
    depend, in the last bits, on the threads)."""
    import config
    import face_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = face_models.load_face_model(config.make_config("tiny").face_model)
    torch.set_num_threads(threads)
    return model
