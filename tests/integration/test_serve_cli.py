"""``splitserve serve DIR --port P --api-key K`` as a user runs it: a real
process that starts its own local Ray cluster on a generated checkpoint,
driven by the official openai client, then stopped with Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from tests.fixtures.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "cli-key"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    http, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve.cluster.cli.main", "serve", str(tiny_llama),
             "--served-model-name", "tiny", "--port", str(http), "--grpc-port", str(grpc_port),
             "--api-key", KEY, "--max-model-len", "256", "--num-cpus", "4"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "ready in" not in log.read_text():
            assert proc.poll() is None, f"serve exited early:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"serve not ready:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{http}/v1", proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_official_client_talks_to_the_served_checkpoint(served):
    url, _, _ = served
    client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="hello there", max_tokens=5,
                                    temperature=0)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 3


def test_the_api_key_is_required(served):
    url, _, _ = served
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/models", timeout=30).status_code == 401


def test_ctrl_c_stops_the_cluster(served):
    _, proc, log = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert "shutting down" in log.read_text()
