"""Fixtures shared by the HTTP and gRPC API tests: real engines on tiny
checkpoints behind a LocalBackend, and a polling helper."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.cluster.api.backend import LocalBackend
from splitserve.engine.config import EngineConfig
from splitserve.engine.default_model import ensure_default_model
from splitserve.engine.llm_engine import LLMEngine


def make_engine(path, name):
    return LLMEngine(EngineConfig(model=str(path), model_id=name, num_blocks=256, block_size=16))


def wait_until(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture(scope="module")
def paths(tiny_checkpoints, tmp_path_factory):
    return {"tiny-llama": tiny_checkpoints["llama"], "tiny-qwen": tiny_checkpoints["qwen2"],
            "slow": ensure_default_model(tmp_path_factory.getbasetemp() / "default-model")}


@pytest.fixture(scope="module")
def engines(paths):
    return {name: make_engine(p, name) for name, p in paths.items()}


@pytest.fixture(scope="module")
def refs(paths):
    """Second engines of the same checkpoints: the reference outputs."""
    return {name: make_engine(paths[name], name) for name in ("tiny-llama", "tiny-qwen")}


@pytest.fixture(scope="module")
def local(engines):
    backend = LocalBackend(engines)
    yield backend
    asyncio.run(backend.close())
