"""One request through each client API of a running cluster, printed.

Where an API serves TLS, the check trusts exactly the certificate the
config names (pinned: that certificate as the only anchor, whatever issued
it), so it runs on loopback whatever names the certificate carries."""

from __future__ import annotations

import ssl
import sys

from splitserve.cluster.config import ClusterConfig


def pinned_context(cert_file: str) -> ssl.SSLContext:
    """A client context that accepts only the server certificate in
    ``cert_file`` (not its issuer's other certificates; any host name)."""
    ctx = ssl.create_default_context(cafile=cert_file)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the anchor
    ctx.check_hostname = False  # pinned to one certificate: the name adds nothing
    return ctx


def smoke_test(cfg: ClusterConfig) -> bool:
    import grpc
    import httpx

    from splitserve.cluster.api.proto import splitserve_pb2 as pb
    from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc

    from splitserve.cluster.serve.http_proxy import url

    ep = cfg.endpoints
    model = cfg.models[0].model.name
    headers = {"Authorization": f"Bearer {cfg.auth.api_keys[0]}"} if cfg.auth.api_keys else {}
    ok = True
    try:
        verify = True if ep.http_tls_cert is None else pinned_context(ep.http_tls_cert)
        r = httpx.post(f"{url(ep)}/v1/completions", headers=headers, timeout=60, verify=verify,
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
        target = f"{ep.host}:{ep.grpc_port}"
        if ep.grpc_tls_cert is None:
            channel = grpc.insecure_channel(target)
        else:  # trusts the configured certificate (self-signed, or its issuer's in the file)
            with open(ep.grpc_tls_cert, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            channel = grpc.secure_channel(target, creds)
        with channel as ch:
            stub = pb_grpc.GenerationStub(ch)
            req = pb.GenerateRequest(model=model, text="The quick brown fox",
                                     params=pb.SamplingParams(max_tokens=16, temperature=0.0))
            text = "".join(r.text for r in stub.Generate(req, metadata=md, timeout=60))
        print(f"gRPC Generate -> {text!r}")
    except Exception as e:  # noqa: BLE001 - reported
        print(f"gRPC request failed: {e}", file=sys.stderr)
        ok = False
    return ok
