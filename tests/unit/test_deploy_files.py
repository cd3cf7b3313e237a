"""The operator files under deploy/ and the operators' guide: every config
loads, every YAML parses, the cluster files give each pool's node type a
node that carries it, and the guide's config reference matches the schema."""

import importlib
from pathlib import Path

import pytest
import yaml

from splitserve.cluster.config import config_reference, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIGS = sorted((DEPLOY / "configs").glob("*.yaml"))
ALL_YAML = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))


def test_the_expected_files_exist():
    names = {str(p.relative_to(DEPLOY)) for p in ALL_YAML}
    assert {"configs/local.yaml", "configs/multi-model.yaml", "configs/gpu-llama3-8b.yaml",
            "ray/local-multinode.yaml", "ray/aws.yaml", "kuberay/rayservice.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.models


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_local_config_is_one_prefill_and_one_decode_of_the_default_model():
    served = load_config(DEPLOY / "configs/local.yaml").models
    assert len(served) == 1 and served[0].model.path is None
    assert served[0].mode == "disaggregated"
    assert served[0].prefill.min_replicas == served[0].decode.min_replicas == 1


def test_configs_cover_every_bottleneck():
    seen = {pool.autoscaling.bottleneck for p in CONFIGS for m in load_config(p).models
            for pool in (m.prefill, m.decode) if pool.autoscaling}
    assert seen == {"compute", "memory", "network"}


def node_type_resources(path):
    """node type -> custom resources of a `ray up` cluster file."""
    d = yaml.safe_load(path.read_text())
    if "available_node_types" in d:
        return {n: t.get("resources", {}) for n, t in d["available_node_types"].items()}
    # the on-premise file starts each worker with one of the resources
    cmds = " ".join(d["worker_start_ray_commands"])
    return {r: {r: 1} for r in ("prefill_node", "decode_node") if r in cmds}


@pytest.mark.parametrize("cluster_file", ["ray/aws.yaml", "ray/local-multinode.yaml"])
def test_cluster_files_carry_the_pools_node_types(cluster_file):
    carried = {r for res in node_type_resources(DEPLOY / cluster_file).values() for r in res}
    wanted = {pool.node_type for m in load_config(DEPLOY / "configs/gpu-llama3-8b.yaml").models
              for pool in (m.prefill, m.decode)}
    assert wanted == {"prefill_node", "decode_node"} and wanted <= carried


def test_aws_node_types_have_bounds_gpus_and_install_splitserve():
    d = yaml.safe_load((DEPLOY / "ray/aws.yaml").read_text())
    types = d["available_node_types"]
    for name in ("prefill_gpu", "decode_gpu"):
        assert types[name]["resources"]["GPU"] > 0
        assert 0 < types[name]["min_workers"] <= types[name]["max_workers"]
    assert any("pip install -e ~/splitserve" in c for c in d["setup_commands"])
    assert d["head_node_type"] in types


def test_rayservice_apps_build_from_a_valid_config():
    d = yaml.safe_load((DEPLOY / "kuberay/rayservice.yaml").read_text())
    assert d["kind"] == "RayService"
    groups = {g["groupName"]: g for g in d["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill-gpu", "decode-gpu"}
    assert "prefill_node" in groups["prefill-gpu"]["rayStartParams"]["resources"]
    assert "decode_node" in groups["decode-gpu"]["rayStartParams"]["resources"]
    apps = yaml.safe_load(d["spec"]["serveConfigV2"])["applications"]
    for a in apps:
        module, attr = a["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        cfg = parse_config(a["args"]["config"])
        if "role" in a["args"]:
            assert a["name"] == f"{a['args']['model']}-{a['args']['role']}"
            assert a["args"]["model"] in {m.model.name for m in cfg.models}
    assert sorted(a["name"] for a in apps) == [
        "ingress", "llama-3-8b-instruct-decode", "llama-3-8b-instruct-prefill"]


def test_operators_guide_reference_is_in_sync():
    text = (ROOT / "docs/operators.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    embedded = text[text.index(start) + len(start):text.index(end)]
    assert embedded == config_reference(), (
        "docs/operators.md is out of date: run scripts/gen_config_reference.py (it writes "
        "config_reference() between the config-reference markers)")


def test_operators_guide_covers_the_workflow():
    text = (ROOT / "docs/operators.md").read_text()
    for words in ("ray up deploy/ray/", "splitserve deploy", "splitserve status",
                  "ray down", "## 5. Edit autoscaling and re-apply"):
        assert words in text


@pytest.mark.parametrize("args,message", [
    ({"model": "x", "role": "prefill"},
     "builder args need 'config': the operator config as a mapping"),
    ({"config": {"models": [{"model": {"name": "a"}}]}, "model": "b", "role": "decode"},
     "args.model 'b' is not in the config; models: ['a']"),
    ({"config": {"models": [{"model": {"name": "a"}, "mode": "colocated"}]}, "model": "a",
      "role": "prefill"},
     "args.role 'prefill' does not exist for model 'a' in colocated mode; pools: ['a-colocated']"),
])
def test_serve_builders_refuse_inconsistent_args(args, message):
    from splitserve.cluster.config import ConfigError
    from splitserve.cluster.serve.apps import pool_app

    with pytest.raises(ConfigError) as e:
        pool_app(args)
    assert str(e.value) == message


@pytest.mark.parametrize("cluster_file", ["ray/aws.yaml", "ray/local-multinode.yaml"])
def test_the_ray_dashboard_stays_on_the_heads_loopback(cluster_file):
    commands = " ".join(yaml.safe_load((DEPLOY / cluster_file).read_text())["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands and "0.0.0.0" not in commands


@pytest.mark.parametrize("cluster_file", ["ray/aws.yaml", "ray/local-multinode.yaml"])
def test_every_node_starts_with_rays_token_auth(cluster_file):
    d = yaml.safe_load((DEPLOY / cluster_file).read_text())
    starts = [c for c in d["head_start_ray_commands"] + d["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert d["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in d["setup_commands"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_exposed_beyond_loopback_require_api_keys(path):
    cfg = load_config(path)
    assert cfg.endpoints.is_loopback() or cfg.auth.has_api_keys()
    assert not cfg.endpoints.allow_unauthenticated and not cfg.auth.api_keys
    assert cfg.auth.cluster_token is None  # never a fixed secret in a shipped file


def test_the_rayservice_takes_its_secrets_from_a_kubernetes_secret():
    text = (DEPLOY / "kuberay/rayservice.yaml").read_text()
    config = yaml.safe_load(yaml.safe_load(text)["spec"]["serveConfigV2"])
    cfg = parse_config(config["applications"][0]["args"]["config"])
    assert cfg.auth.api_keys_env == "SPLITSERVE_API_KEYS" and not cfg.auth.api_keys
    assert text.count("key: api-keys}") == text.count("key: cluster-token}") >= 3
    policy = yaml.safe_load((DEPLOY / "kuberay/networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy"
