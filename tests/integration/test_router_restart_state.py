"""What a router finds again when Ray restarts it (real local Ray, router
actors only): the prefer-local-prefill switch the autoscaler set, and the
config and stream TLS of its last deploy, not those it was first created
with; and what the ops ledger finds again (the config last applied)."""

import time

import pytest
import ray

from splitserve.cluster.autoscaling import publish
from splitserve.cluster.serve import router_state
from splitserve.cluster.serve.router_actor import ensure_routers, get_router, kill_routers
from splitserve.router.config import ModelFacts, RouterConfig
from tests.integration.ray_cluster import local_ray
from tests.unit.tls_certs import CA

pytestmark = pytest.mark.slow


def config(*models) -> RouterConfig:
    return RouterConfig(policy="cost", models={m: ModelFacts(16, 1000) for m in models})


def restart(index: int) -> dict:
    """Kill router ``index`` (Ray restarts it); its counters once it answers."""
    before = ray.get(get_router(index=index).counters.remote())["incarnation"]
    ray.kill(get_router(index=index), no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            c = ray.get(get_router(index=index).counters.remote(), timeout=10)
            if c["incarnation"] != before:
                return c
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the router did not come back"
        time.sleep(0.2)


def models_of(index: int) -> set[str]:
    return set(ray.get(get_router(index=index).live_replicas.remote()))


def test_a_restarted_router_keeps_the_switch_and_its_last_config(tmp_path):
    ca = CA()
    cert, key = ca.issue("router", ips=("127.0.0.1",)).write(tmp_path, "router")
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    tls = {"cert": cert, "key": key, "ca": str(tmp_path / "ca.crt"), "mutual": True,
           "server_name": None}
    with local_ray(num_cpus=2):
        ensure_routers(config("a"), 2)
        assert [ray.get(get_router(index=i).counters.remote())["prefer_local_prefill"]
                for i in range(2)] == [False, False]
        # the autoscaler's network signal, as its policy sends it (to router 0)
        assert publish.set_prefer_local_prefill(True)
        deadline = time.monotonic() + 10
        while not all(ray.get(get_router(index=i).counters.remote())["prefer_local_prefill"]
                      for i in range(2)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert restart(0)["prefer_local_prefill"] is True
        assert restart(1)["prefer_local_prefill"] is True  # a router it was forwarded to

        # a redeploy adds a model and turns TLS on; a restart must not bring
        # back the first config, nor a plaintext stream
        assert ray.get(get_router(index=0).endpoint.remote()).tls is False
        ensure_routers(config("a", "b"), 2, reconfigure=True, tls=tls)
        assert ray.get(get_router(index=0).counters.remote())["prefer_local_prefill"] is True
        assert ray.get(get_router(index=0).endpoint.remote()).tls is True
        restart(0)
        assert models_of(0) == {"a", "b"}
        assert ray.get(get_router(index=0).endpoint.remote()).tls is True
        assert router_state.load() == router_state.RouterState(config("a", "b"), True, tls, True)

        # switched off: a restart keeps it off
        ray.get(get_router(index=0).set_prefer_local_prefill.remote(False))
        assert restart(0)["prefer_local_prefill"] is False

        # removing the routers forgets their state: a new cluster starts clean
        kill_routers()
        assert router_state.load() == router_state.RouterState(None, False)
        get_router(create_with=config("c"), index=0, count=1)
        assert models_of(0) == {"c"} and router_state.load().config == config("c")
        kill_routers()


def test_a_restarted_ops_ledger_keeps_the_config_last_applied():
    """The ledger is restarted on another node when its node is lost: the
    config last applied (what ``splitserve status`` and the next deploy's
    diff read) comes back from the GCS; a reset (the cluster shut down)
    forgets it for good."""
    import os

    from splitserve.cluster.autoscaling.ledger import get_ledger

    def ask(method: str):
        """``method`` of the ledger's current incarnation, once it answers."""
        deadline = time.monotonic() + 60
        while True:
            try:
                led = get_ledger()
                if method == "pid":
                    return ray.get(led.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
                return ray.get(getattr(led, method).remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError):
                assert time.monotonic() < deadline, "the ledger did not come back"
                time.sleep(0.2)

    def restart() -> None:
        before = ask("pid")
        ray.kill(get_ledger(), no_restart=False)
        while ask("pid") == before:
            time.sleep(0.2)

    cfg = {"name": "kept", "models": [{"model": {"name": "m"}}]}
    with local_ray(num_cpus=2):
        led = get_ledger(create=True)
        assert ray.get(led.config.remote()) is None
        ray.get(led.set_config.remote(cfg, "v1"))
        applied = ray.get(led.applied_at.remote())
        restart()
        assert (ask("config"), ask("secrets_version"), ask("applied_at")) == (cfg, "v1", applied)
        ray.get(get_ledger().reset.remote())
        restart()
        assert (ask("config"), ask("secrets_version"), ask("applied_at")) == (None, None, None)
