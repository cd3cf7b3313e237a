"""Fixtures shared by the HTTP and gRPC API tests: real engines on tiny
checkpoints behind a LocalBackend, the HTTP API serving it from a thread
(``url``, an OpenAI ``client`` of it), and a polling helper."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import openai
import pytest
import uvicorn

from splitserve.cluster.api.backend import LocalBackend
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.engine.config import EngineConfig
from splitserve.engine.default_model import default_model_path
from splitserve.engine.llm_engine import LLMEngine

KEY = "sk-test-key"


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
            "slow": default_model_path()}


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


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) from a thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def url(local):
    """The HTTP API of ``local``, key ``KEY``, served from a thread."""
    server = ServerThread(build_http_app(local, [KEY], 1 << 20))
    yield server.url
    server.stop()


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
