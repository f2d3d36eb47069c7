"""Settings and fixtures for every test: offline Hugging Face libraries, two torch threads, each test
leaving the thread count as it found it. Helpers to import live beside this file (`model_utils`,
`train_utils`, `inference_utils`); each area's folder has its own conftest.py where it needs one."""

import os

import pytest
import torch

from model_utils import tiny_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Trainers and decoders set their own thread counts; the next test starts from the same one."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture
def one_thread():
    """Tiny models decode fastest on one thread (and do not oversubscribe a shared CPU)."""
    torch.set_num_threads(1)
    yield
