"""``ray up`` of the shipped on-premise cluster file, for real: a head, a
prefill worker and a decode worker, each an sshd on its own loopback
address and in its own PID/mount namespace (tests/fixtures/ssh_nodes.py).
``splitserve deploy`` runs on the head through ``ray exec``, the official
openai client is served through the API, each pool's replicas are found on
the node type the pool asks for, and ``ray down`` plus the fixture leave
nothing running.

The cluster file is deploy/ray/local-multinode.yaml with only what a test
host needs changed (see ``cluster_file``); the start commands, their
node-type mapping and the resources are the shipped ones."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from tests.fixtures.ssh_nodes import SSHNodes, Unavailable, free_port_on, ssh_nodes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "ray" / "local-multinode.yaml"
RAY = str(Path(sys.executable).parent / "ray")
KEY = "sk-ray-up-test"
GCS_PORT = 6379  # the shipped file's; replaced by a free one
TOKEN_MOUNT = "~/.ray/auth_token"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # three nodes on one host: keep /dev/shm small


def shipped_prefill_ips(shipped: dict) -> str:
    """The case pattern of the shipped worker command that selects prefill
    nodes: its first two worker addresses (see the file's comments)."""
    return "|".join(shipped["provider"]["worker_ips"][:2])


def cluster_file(nodes: SSHNodes, name: str, token: Path) -> dict:
    """The shipped file made to run on ``nodes`` (head, prefill, decode).
    Changed: the name, addresses, ssh login, worker count; the checkout is
    not copied nor installed (every node already runs it in this Python
    environment, through its ``.bashrc``), only Ray's ``token`` is; a free
    GCS port; and flags that
    let three nodes share one host (ports Ray would otherwise take by
    default on 127.0.0.1, a small object store, two CPUs each)."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    head, prefill, decode = nodes.ips
    gcs = free_port_on(head)
    agent = [free_port_on("127.0.0.1") for _ in range(3)]
    cfg = dict(shipped)
    cfg["cluster_name"] = name
    cfg["provider"] = {**shipped["provider"], "head_ip": head, "worker_ips": [prefill, decode]}
    cfg["auth"] = {"ssh_user": nodes.user, "ssh_private_key": str(nodes.key)}
    cfg["min_workers"] = cfg["max_workers"] = 2
    # the checkout is not copied, but Ray's token is, as the shipped file does
    assert shipped["file_mounts"].get(TOKEN_MOUNT) == TOKEN_MOUNT, shipped["file_mounts"]
    cfg["file_mounts"] = {TOKEN_MOUNT: str(token)}
    cfg["setup_commands"] = []
    common = f" --num-cpus=2 --object-store-memory={OBJECT_STORE_BYTES}"

    def adapt(cmds: list[str], extra: str) -> list[str]:
        out = []
        for c in cmds:
            if "ray start" in c:
                assert f"{GCS_PORT}" in c, c
                c = c.replace(f"={GCS_PORT}", f"={gcs}").replace(f":{GCS_PORT}", f":{gcs}")
                c += common + extra
            out.append(c)
        return out

    cfg["head_start_ray_commands"] = adapt(
        shipped["head_start_ray_commands"],
        f" --dashboard-port={free_port_on('127.0.0.1')} --dashboard-agent-listen-port={agent[0]}"
        f" --ray-client-server-port={free_port_on(head)}")
    pattern = shipped_prefill_ips(shipped)
    workers = shipped["worker_start_ray_commands"]
    assert any(pattern in c for c in workers), "the shipped node-type mapping changed"
    cfg["worker_start_ray_commands"] = adapt(
        [c.replace(pattern, prefill) for c in workers],
        f' --dashboard-agent-listen-port=$([ "$NODE_IP" = {prefill} ]'
        f" && echo {agent[1]} || echo {agent[2]})")
    return cfg


def operator_config(checkpoint: Path, http: int, grpc: int) -> dict:
    pool = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}
    return {
        "name": "ray-up",
        "models": [{
            "model": {"name": "tiny", "path": str(checkpoint), "num_blocks": 64, "block_size": 4},
            "mode": "disaggregated",
            "prefill": {**pool, "node_type": "prefill_node"},
            "decode": {**pool, "node_type": "decode_node"},
        }],
        # every prompt through the prefill pool, never prefilled on decode
        "router": {"local_prefill_max_tokens": 0},
        "transfer": {"transport": "grpc"},
        "auth": {"api_keys": [KEY]},
        "endpoints": {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc},
    }


class RayCLI:
    """``ray up|exec|down`` on one cluster file, output kept for failures."""

    def __init__(self, path: Path, log: Path):
        self.path, self.log = path, log
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.env.pop("RAY_ADDRESS", None)

    def __call__(self, *args: str, timeout: float) -> str:
        cmd = [RAY, *args]
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                else (e.stdout or "")
            self._keep(cmd, out, time.monotonic() - start)
            raise AssertionError(f"{' '.join(args[:1])} timed out after {timeout}s:\n"
                                 f"{out[-4000:]}") from None
        out = done.stdout + done.stderr
        self._keep(cmd, out, time.monotonic() - start)
        assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{out[-6000:]}"
        return out

    def _keep(self, cmd: list[str], out: str, took: float) -> None:
        with open(self.log, "a") as f:
            f.write(f"$ {' '.join(cmd)}  ({took:.1f}s)\n{out}\n")


@pytest.fixture
def nodes(tmp_path):
    try:
        with ssh_nodes(tmp_path / "nodes", 3, {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": str(ROOT),
            "RAY_USAGE_STATS_ENABLED": "0",
            # what the shipped setup_commands append to ~/.bashrc
            "RAY_AUTH_MODE": "token",
        }) as ns:
            yield ns
    except Unavailable as e:
        pytest.skip(f"ray up test needs: {e}")
    # the context killed every node's namespace: nothing of them may be left
    assert not ns.leftovers(), f"processes left running: {ns.leftovers()}"


def _forget_local_state(name: str) -> None:
    """What ``ray up`` leaves on the launching host: the local provider's
    state and lock in /tmp/ray, its ssh control sockets."""
    for suffix in ("state", "lock"):
        Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
    user_h = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    name_h = hashlib.sha256(name.encode()).hexdigest()[:10]
    shutil.rmtree(f"/tmp/ray_ssh_{user_h}/{name_h}", ignore_errors=True)


def test_ray_up_deploys_each_pool_on_its_node_type(nodes, tiny_llama, tmp_path):
    started = time.monotonic()
    name = f"splitserve-test-{uuid.uuid4().hex[:8]}"
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    cfg = cluster_file(nodes, name, token)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    head, prefill, decode = nodes.ips
    op = tmp_path / "splitserve.yaml"
    ray = RayCLI(path, tmp_path / "ray-cli.log")
    try:
        ray("up", "-y", "--no-config-cache", str(path), timeout=180)
        # `ray up` returns once the head runs; the head's autoscaler then
        # starts the workers over ssh: wait until both joined
        probe = "python -m tests.integration.ray_up_probe"
        deadline = time.monotonic() + 180
        while True:
            placement = _placement(ray(
                "exec", "--no-config-cache", str(path), probe, timeout=120))
            if len(placement["nodes"]) == 3 or time.monotonic() > deadline:
                break
            time.sleep(2)
        ips = {n["ip"]: n["resources"] for n in placement["nodes"]}
        assert set(ips) == {head, prefill, decode}, placement
        assert ips[prefill].get("prefill_node") == 8 and "decode_node" not in ips[prefill]
        assert ips[decode].get("decode_node") == 8 and "prefill_node" not in ips[decode]
        assert ips[head].get("head_node") == 1
        # the API ports, chosen once Ray's own processes hold theirs
        http, grpc = free_port_on("127.0.0.1"), free_port_on("127.0.0.1")
        op.write_text(yaml.safe_dump(operator_config(tiny_llama, http, grpc), sort_keys=False))

        ray("exec", "--no-config-cache", str(path),
            f"splitserve deploy {op} --wait-s 180", timeout=240)

        client = OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key=KEY, max_retries=2,
                        timeout=120)
        out = client.completions.create(model="tiny", prompt="hello there", max_tokens=4,
                                        temperature=0)
        assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"

        placement = _placement(ray("exec", "--no-config-cache", str(path), probe, timeout=120))
        where = {}
        for r in placement["replicas"]:
            app = r["class_name"].split(":")[1]
            where.setdefault(app, set()).add(r["node_ip"])
        assert where.get("tiny-prefill") == {prefill}, placement
        assert where.get("tiny-decode") == {decode}, placement
    finally:
        try:
            ray("down", "-y", str(path), timeout=120)
        finally:
            _forget_local_state(name)
            print(f"ray up test: {time.monotonic() - started:.1f}s "
                  f"(ray CLI log: {tmp_path / 'ray-cli.log'})")


def _placement(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("PLACEMENT ")]
    assert lines, f"no placement printed:\n{out[-4000:]}"
    return json.loads(lines[-1].removeprefix("PLACEMENT "))
