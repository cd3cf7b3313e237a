"""A deploy whose pool cannot start ends with an error naming the pool's
application, not a generic timeout: deploy submits every application at once
and watches Serve's status of each (``app_status``)."""

import argparse
import contextlib
import io
import shutil
import time

import pytest
import ray
import yaml
from ray import serve

from splitserve.cluster.config import parse_config
from splitserve.cluster.cli import ops as cli_ops
from splitserve.cluster.serve import app, secrets
from splitserve.cluster.autoscaling.ledger import get_ledger
from splitserve.cluster.serve.app_status import DeployFailed, DeployInProgress
from tests.integration.ray_cluster import local_ray
from tests.fixtures.ports import free_port


def _cfg(**pools):
    """name -> (checkpoint, decode pool) of colocated models."""
    return parse_config({
        "models": [{"model": {"name": name, "path": str(path), "num_blocks": 64, "block_size": 4},
                    "mode": "colocated", "decode": pool}
                   for name, (path, pool) in pools.items()],
        "auth": {"api_keys": ["sk-fail"], "cluster_token": "fail-token"},
        "endpoints": {"http_port": free_port(), "grpc_port": free_port()},
    })


@pytest.mark.slow
def test_failing_pools_are_named_with_serve_s_reason(tiny_llama, tmp_path, monkeypatch):
    # weights that cannot be read: the checkpoint's metadata passes the
    # driver's checks, each replica's constructor raises loading it.
    # Serve gives up after one failed start per replica instead of three
    # (read by its controller, a process of the cluster started below): the
    # verdict and its reason are the same, ~20 s sooner
    monkeypatch.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}
    with local_ray(num_cpus=4):
        t0 = time.monotonic()
        with pytest.raises(DeployFailed) as failed:
            app.deploy(_cfg(good=(tiny_llama, pool), bad=(corrupt, pool)), wait_s=240)
        msg = str(failed.value)
        assert msg.startswith("application 'bad-colocated' failed to deploy: DEPLOY_FAILED"), msg
        assert "unreadable safetensors file" in msg  # the constructor's own error
        assert "good-colocated" not in msg
        assert time.monotonic() - t0 < 200  # Serve's verdict, not the deploy's timeout
        _a_refused_edit_changes_nothing(tmp_path)
        app.shutdown()

        # a replica asking for more CPUs than the cluster has never starts:
        # the timeout names its application and that Serve still deploys it
        big = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 64}
        with pytest.raises(TimeoutError, match=r"pools not ready after 5s: bad-colocated "
                                               r"\(DEPLOYING"):
            app.deploy(_cfg(bad=(tiny_llama, big)), wait_s=5)
        # no app.shutdown(): Serve's graceful shutdown waits out its 30 s
        # limit on a replica still waiting for resources; the cluster goes


def _a_refused_edit_changes_nothing(tmp_path):
    """On the running cluster: a file naming a checkpoint that is not there
    (and a new cluster token and API key) is refused with one line, exit
    status 1, before anything changed: the secrets replicas read, the
    applications. Then one deploy while another holds the lease."""
    apps = set(serve.status().applications)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"model": {"name": "good", "path": str(tmp_path / "nowhere")},
                    "mode": "colocated"}],
        "auth": {"api_keys": ["sk-new"], "cluster_token": "new-token"}}))
    parser = argparse.ArgumentParser(prog="splitserve")
    cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["deploy", str(path), "--address",
                              ray.get_runtime_context().gcs_address])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert args.func(args) == 1
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'good': checkpoint directory"), \
        err.getvalue()
    assert secrets.cluster_token() == "fail-token"
    assert set(serve.status().applications) == apps

    # while another deploy applies its config, a second one is refused
    # (it would interleave with it) and changes nothing
    ledger = get_ledger()
    assert ray.get(ledger.begin_deploy.remote("elsewhere:1:ab", 60.0)) is None
    try:
        with pytest.raises(DeployInProgress, match=r"another deploy \(elsewhere:1:ab\)"):
            app.deploy(_cfg(good=(tmp_path / "corrupt", {"min_replicas": 1})), wait_s=5)
    finally:
        ray.get(ledger.end_deploy.remote("elsewhere:1:ab"))
    assert set(serve.status().applications) == apps
