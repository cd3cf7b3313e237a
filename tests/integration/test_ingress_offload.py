"""A huge request does not stall the streams the ingress serves: while a
gRPC Tokenize of a 1 MB text, or an HTTP completion with a 1 MB prompt, is
being tokenized (seconds on a loaded 2-core machine), a running HTTP
stream keeps receiving tokens. Bound: no gap in the stream longer than
half the big call's duration (or 1 s, if more). With the tokenizer holding
the GIL, the stream stopped for the whole gRPC call; with the HTTP prompt
tokenized on the event loop, for the whole HTTP call.

Real uvicorn and grpc.aio servers on loopback over real engines; the
backend reports a context of a million tokens so that the big texts pass
the character bound and reach the tokenizer."""

import threading
import time

import grpc
import httpx
import pytest

from splitserve.cluster.api.backend import Backend, ModelInfo
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.prepare import PreparePool
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.cluster.api.backend import DEFAULT_OPTIONS
from tests.integration.api_fixtures import engines, local, paths, wait_until  # noqa: F401
from tests.integration.test_grpc_api import GrpcServerThread
from tests.integration.test_openai_api import ServerThread

KEY = "offload-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MD = (("authorization", f"Bearer {KEY}"),)
BIG_TEXT = ("The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 13000)[:1_000_000]
LIMIT_BYTES = 8 << 20
MIN_TOKENS_DURING = 3


class WideContext(Backend):
    """``inner`` with every model's context reported as a million tokens."""

    def __init__(self, inner: Backend):
        self.inner = inner

    def models(self):
        return [ModelInfo(m.name, 1 << 20, m.created) for m in self.inner.models()]

    def tokenizer(self, model):
        return self.inner.tokenizer(model)

    def validate(self, model, prompt_token_ids, params):
        self.inner.validate(model, prompt_token_ids, params)

    def generate(self, model, request_id, prompt_token_ids, params, options=DEFAULT_OPTIONS):
        return self.inner.generate(model, request_id, prompt_token_ids, params, options)


@pytest.fixture(scope="module")
def servers(local):
    backend, pool = WideContext(local), PreparePool(threads=2)
    http = ServerThread(build_http_app(backend, [KEY], LIMIT_BYTES, pool=pool))
    rpc = GrpcServerThread(backend, api_keys=[KEY], max_message_bytes=LIMIT_BYTES, pool=pool)
    yield http.url, rpc.target
    rpc.stop()
    http.stop()
    pool.close()


class Stream:
    """An HTTP completion stream of the slow model, read on a thread that
    notes when each chunk arrives."""

    def __init__(self, url: str):
        self.times: list[float] = []
        self.done_at = float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self._thread.start()
        assert wait_until(lambda: len(self.times) >= 3, timeout=60), "the stream did not start"

    def _read(self, url: str) -> None:
        body = {"model": "slow", "prompt": "hello", "max_tokens": 2000, "ignore_eos": True,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.times.append(time.perf_counter())
                elif line == "data: [DONE]":
                    self.done_at = time.perf_counter()
                if self._stop.is_set():
                    return

    def longest_gap(self, start: float, end: float) -> tuple[float, int]:
        """(longest time without a chunk within [start, end], chunks in it).
        A stream that ended in the window was not stalled up to its end."""
        end = min(end, self.done_at)
        inside = [t for t in self.times if start < t < end]
        points = [start, *inside, end]
        return max(b - a for a, b in zip(points, points[1:])), len(inside)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def grpc_tokenize(target: str) -> None:
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", LIMIT_BYTES),
                                                ("grpc.max_receive_message_length", LIMIT_BYTES)]) as ch:
        r = pb_grpc.GenerationStub(ch).Tokenize(pb.TokenizeRequest(model="slow", text=BIG_TEXT),
                                                metadata=MD, timeout=120)
    assert len(r.token_ids) > 100_000


def http_big_prompt(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"model": "slow", "prompt": BIG_TEXT, "max_tokens": 1},
                   headers=AUTH, timeout=120)
    # tokenized, then refused by the model's real context
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.parametrize("big_call", [grpc_tokenize, http_big_prompt], ids=["grpc-tokenize", "http-prompt"])
def test_a_huge_request_does_not_stall_a_running_stream(servers, local, engines, big_call):
    url, target = servers
    stream = Stream(url)
    try:
        start = time.perf_counter()
        big_call(target if big_call is grpc_tokenize else url)
        end = time.perf_counter()
        gap, during = stream.longest_gap(start, end)
    finally:
        stream.close()
    bound = max(1.0, (end - start) / 2)
    assert gap <= bound and (during >= MIN_TOKENS_DURING or stream.done_at < end), \
        f"the big call took {end - start:.2f} s; the stream got {during} chunks, longest gap {gap:.2f} s"
    assert wait_until(lambda: local.all_blocks_free() and not any(
        e.has_unfinished() for e in engines.values()), timeout=30)
