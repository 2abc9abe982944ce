from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_adapter, make_model  # noqa: E402


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("llama") / "base", "llama", layers=2)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("qwen") / "base", "qwen2", layers=2)


@pytest.fixture(scope="session")
def llama_adapter(tmp_path_factory, llama_dir) -> Path:
    return make_adapter(llama_dir, tmp_path_factory.mktemp("lla") / "adapter", "llama", r=4, alpha=8)


@pytest.fixture(scope="session")
def qwen_adapter(tmp_path_factory, qwen_dir) -> Path:
    return make_adapter(qwen_dir, tmp_path_factory.mktemp("qwa") / "adapter", "qwen2", r=4, alpha=16)
