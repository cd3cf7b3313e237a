"""One request through each client API of a running cluster, printed."""

from __future__ import annotations

import sys

from splitserve.cluster.config import ClusterConfig


def smoke_test(cfg: ClusterConfig) -> bool:
    import grpc
    import httpx

    from splitserve.cluster.api.proto import splitserve_pb2 as pb
    from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc

    ep = cfg.endpoints
    model = cfg.models[0].model.name
    headers = {"Authorization": f"Bearer {cfg.auth.api_keys[0]}"} if cfg.auth.api_keys else {}
    ok = True
    try:
        r = httpx.post(f"http://{ep.host}:{ep.http_port}/v1/completions", headers=headers, timeout=60,
                       json={"model": model, "prompt": "The quick brown fox", "max_tokens": 16,
                             "temperature": 0})
        r.raise_for_status()
        body = r.json()
        print(f"HTTP /v1/completions -> {body['choices'][0]['text']!r} "
              f"(finish_reason={body['choices'][0]['finish_reason']}, usage={body['usage']})")
    except Exception as e:  # noqa: BLE001 - reported
        print(f"HTTP request failed: {e}", file=sys.stderr)
        ok = False
    try:
        md = [("authorization", f"Bearer {cfg.auth.api_keys[0]}")] if cfg.auth.api_keys else []
        with grpc.insecure_channel(f"{ep.host}:{ep.grpc_port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            req = pb.GenerateRequest(model=model, text="The quick brown fox",
                                     params=pb.SamplingParams(max_tokens=16, temperature=0.0))
            text = "".join(r.text for r in stub.Generate(req, metadata=md, timeout=60))
        print(f"gRPC Generate -> {text!r}")
    except Exception as e:  # noqa: BLE001 - reported
        print(f"gRPC request failed: {e}", file=sys.stderr)
        ok = False
    return ok
