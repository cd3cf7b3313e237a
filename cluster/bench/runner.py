"""The async driver: sends requests on the arrival schedule and records, per
request, its send time, each streamed output's arrival and any error.

Targets (all stream; all ask for greedy sampling with ``ignore_eos`` so each
request produces exactly its ``output_len`` tokens):
  HttpTarget     POST /v1/completions with SSE (httpx), the phase timings
                 asked for with ``x-splitserve-timings: 1``
  GrpcTarget     splitserve.v1.Generation/Generate (the stubs in cluster/api/proto)
  BackendTarget  a ``splitserve.cluster.api.backend.Backend`` in this process (ClusterBackend
                 or LocalBackend), without any client API in between
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
from dataclasses import dataclass

from splitserve.cluster.bench.arrivals import ArrivalSpec, arrival_offsets
from splitserve.cluster.bench.datasets import BenchRequest
from splitserve.cluster.bench.progress import Progress
from splitserve.cluster.bench.stats import RequestRecord

TIMINGS_HEADER = "x-splitserve-timings"


class RequestFailed(Exception):
    """The server refused or broke off one request; the message says how."""


class Target(abc.ABC):
    """Where requests go. ``send`` streams one request, appending each
    output's arrival (``clock()``) to ``rec.chunk_times`` and setting
    ``rec.output_tokens`` and ``rec.timings``; it raises on failure."""

    description: str = ""

    async def start(self) -> None:
        pass

    @abc.abstractmethod
    async def send(self, req: BenchRequest, rec: RequestRecord, clock) -> None: ...

    async def close(self) -> None:
        pass


class HttpTarget(Target):
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 600.0):
        self.url, self.model = url.rstrip("/"), model
        self.api_key, self.timeout_s = api_key, timeout_s
        self.description = f"HTTP {self.url}/v1/completions model={model}"
        self._client = None

    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    async def send(self, req: BenchRequest, rec: RequestRecord, clock) -> None:
        body = {"model": self.model, "prompt": req.prompt, "max_tokens": req.output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        headers = {TIMINGS_HEADER: "1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        chunks, usage = 0, None
        async with self._client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RequestFailed(f"HTTP {resp.status_code}: {_error_message(text)}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                obj = json.loads(payload)
                if "error" in obj:
                    raise RequestFailed(f"stream error: {obj['error'].get('message', obj['error'])}")
                if obj.get("splitserve_timings") is not None:
                    rec.timings = obj["splitserve_timings"]
                if obj.get("choices"):
                    rec.chunk_times.append(clock())
                    chunks += 1
                if obj.get("usage"):
                    usage = obj["usage"]
        # an SSE chunk may carry several tokens (text held back): usage counts them
        rec.output_tokens = usage["completion_tokens"] if usage else chunks

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return text[:200]


class GrpcTarget(Target):
    def __init__(self, address: str, model: str, api_key: str | None = None,
                 timeout_s: float = 600.0):
        self.address, self.model, self.api_key, self.timeout_s = address, model, api_key, timeout_s
        self.description = f"gRPC {address} model={model}"
        self._channel = self._stub = None

    async def start(self) -> None:
        import grpc

        from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc

        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = pb_grpc.GenerationStub(self._channel)

    async def send(self, req: BenchRequest, rec: RequestRecord, clock) -> None:
        import grpc

        from splitserve.cluster.api.proto import splitserve_pb2 as pb

        params = pb.SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
        msg = pb.GenerateRequest(model=self.model, params=params)
        if isinstance(req.prompt, str):
            msg.text = req.prompt
        else:
            msg.token_ids.ids.extend(req.prompt)
        md = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else None
        try:
            async for r in self._stub.Generate(msg, metadata=md, timeout=self.timeout_s):
                if r.timings and rec.timings is None:
                    rec.timings = dict(r.timings)
                if r.token_ids:
                    rec.chunk_times.append(clock())
                    rec.output_tokens += len(r.token_ids)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(f"gRPC {e.code().name}: {e.details()}") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class BackendTarget(Target):
    def __init__(self, backend, model: str):
        self.backend, self.model = backend, model
        self.description = f"{type(backend).__name__} model={model}"
        self._next_id = 0

    async def send(self, req: BenchRequest, rec: RequestRecord, clock) -> None:
        from splitserve.engine.sampling_params import SamplingParams

        ids = req.prompt if not isinstance(req.prompt, str) else \
            self.backend.tokenizer(self.model).encode(req.prompt)
        params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
        self._next_id += 1
        rid = f"bench-{self._next_id}"
        async for d in self.backend.generate(self.model, rid, list(ids), params):
            if d.get("timings") is not None and rec.timings is None:
                rec.timings = d["timings"]
            if d["token_ids"]:
                rec.chunk_times.append(clock())
                rec.output_tokens += len(d["token_ids"])


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # schedule start -> last request's end
    arrivals: ArrivalSpec
    started_at: float = 0.0  # wall-clock (Unix) seconds when the schedule started


async def run_load(target: Target, requests: list[BenchRequest], arrivals: ArrivalSpec,
                   progress: bool = False, request_timeout_s: float | None = None) -> RunResult:
    """Send ``requests`` on ``arrivals``' schedule; every request's record is
    returned, failed ones with ``error`` set (a run never stops on one)."""
    offsets = arrival_offsets(len(requests), arrivals)
    records = [RequestRecord(i, r.prompt_len, r.output_len) for i, r in enumerate(requests)]
    gate = asyncio.Semaphore(arrivals.concurrency) if arrivals.concurrency else None
    ends: list[float] = []
    await target.start()
    bar = Progress(len(requests), enabled=progress)
    t0 = time.perf_counter()
    started_at = time.time()  # puts the runs of a sweep (and a cluster's events) on one clock

    def clock() -> float:
        return time.perf_counter() - t0

    async def one(req: BenchRequest, rec: RequestRecord, at: float) -> None:
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is not None:
            await gate.acquire()
        rec.send_time = clock()
        try:
            await asyncio.wait_for(target.send(req, rec, clock), request_timeout_s)
        except asyncio.TimeoutError:
            rec.error = f"timed out after {request_timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - recorded per request; the run goes on
            rec.error = str(e) or type(e).__name__
        finally:
            if gate is not None:
                gate.release()
            ends.append(clock())
            bar.advance(failed=rec.error is not None)

    try:
        await asyncio.gather(*(one(q, r, at) for q, r, at in zip(requests, records, offsets)))
    finally:
        await target.close()
        bar.close()
    return RunResult(records, max(ends, default=clock()), arrivals, started_at)
