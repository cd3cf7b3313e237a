"""The operator YAML: each invalid file is refused with its own message naming
the key; what an edit changes; the deploy/status commands' parsing, errors
and table."""

import argparse

import pytest

from splitserve.cluster.cli import ops as cli_ops
from splitserve.cluster.cli.ops import PoolStatus, format_status
from splitserve.cluster.config import ConfigError, config_changes, load_config, parse_config


def write(tmp_path, text, name="cluster.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


INVALID = [
    ("- a\n- b\n", "the top level must be a mapping, got list"),
    ("models: [\n", "invalid YAML: "),
    ("modles: []\n", "modles (line 1, column 1): Extra inputs are not permitted (did you mean 'models'?)"),
    ("models: []\n", "models (line 1, column 1): List should have at least 1 item after validation, not 0"),
    ("models:\n  - prefill: {max_replica: 3}\n",
     "models.0.prefill.max_replica (line 2, column 15): Extra inputs are not permitted (did you mean "
     "'max_replicas'?)"),
    ("models:\n  - decode: {min_replicas: 4, max_replicas: 2}\n",
     "models.0.decode (line 2, column 5): Value error, min_replicas (4) > max_replicas (2)"),
    ("models:\n  - decode: {min_replicas: 1, max_replicas: 2, initial_replicas: 3}\n",
     "models.0.decode (line 2, column 5): Value error, initial_replicas (3) outside [min_replicas, max_replicas]"),
    ("models:\n  - decode: {min_replicas: 0, max_replicas: 2, autoscaling: {bottleneck: memory}}\n",
     "models.0.decode (line 2, column 5): Value error, min_replicas must be at least 1 when autoscaling is set: "
     "the policy scales on metrics that running replicas report"),
    ("models:\n  - decode: {autoscaling: {bottleneck: disk}}\n",
     "models.0.decode.autoscaling.bottleneck (line 2, column 28): Input should be 'compute', 'memory', 'network' or 'requests'"),
    ("models:\n  - decode: {autoscaling: {target_kv_usage: 0.5}}\n",
     "models.0.decode.autoscaling.bottleneck (line 2, column 14): Field required"),
    ("models:\n  - prefill: {autoscaling: {bottleneck: compute, target_busy_fraction: 1.5}}\n",
     "models.0.prefill.autoscaling.target_busy_fraction (line 2, column 50): Input should be less than or equal to 1"),
    ("models:\n  - prefill: {autoscaling: {bottleneck: compute, target_ttft_s: 0}}\n",
     "models.0.prefill.autoscaling.target_ttft_s (line 2, column 50): Input should be greater than 0"),
    ("models:\n  - prefill: {autoscaling: {bottleneck: compute, look_back_s: 2, "
     "metrics_interval_s: 2}}\n",
     "models.0.prefill.autoscaling (line 2, column 15): Value error, look_back_s (2.0) must exceed metrics_interval_s "
     "(2.0) so each window holds a metrics push"),
    ("models:\n  - decode: {autoscaling: {bottleneck: memory, upscale_delay_s: -1}}\n",
     "models.0.decode.autoscaling.upscale_delay_s (line 2, column 48): Input should be greater than or equal to 0"),
    ("models:\n  - model: {name: a}\n  - model: {name: a}\n",
     "(top level): Value error, model names must be unique; repeated: ['a']"),
    ("models:\n  - model: {block_size: 12}\n",
     "models.0.model (line 2, column 5): Value error, block_size must be a power of two, got 12"),
    ("models:\n  - mode: split\n",
     "models.0.mode (line 2, column 5): Input should be 'disaggregated' or 'colocated'"),
    ("models:\n  - model: {tool_call_parser: qwen}\n",
     "models.0.model.tool_call_parser (line 2, column 13): Input should be 'auto', 'hermes', 'mistral' or "
     "'llama3_json'"),
    ("models:\n  - model: {speculative: {method: draft}}\n",
     "models.0.model.speculative (line 2, column 13): Value error, speculative method draft needs draft_model"),
    ("models:\n  - model: {speculative: {method: ngram, ngram_min: 3, ngram_max: 2}}\n",
     "models.0.model.speculative (line 2, column 13): Value error, ngram_min (3) > ngram_max (2)"),
    ("models:\n  - model: {speculative: {method: eagle}}\n",
     "models.0.model.speculative.method (line 2, column 27): Input should be 'ngram' or 'draft'"),
    ("router: {policy: random}\n",
     "router.policy (line 1, column 10): Input should be 'cost', 'prefix_aware', 'least_loaded' or 'round_robin'"),
    ("endpoints: {head_timeout_s: 0}\n",
     "endpoints.head_timeout_s (line 1, column 13): Input should be greater than 0"),
    ("endpoints:\n  head_timeout_s: 4000\n",
     "endpoints.head_timeout_s (line 2, column 3): Input should be less than or equal to 3600"),
]


@pytest.mark.parametrize("text,message", INVALID, ids=[m.split(":")[0] for _, m in INVALID])
def test_invalid_yaml_is_refused_with_its_specific_error(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    if message.endswith(": "):  # the parser's own detail follows
        assert str(e.value).startswith(f"{p}: {message}")
    else:
        assert str(e.value) == f"{p}: {message}"


def test_head_timeout_defaults_to_the_servers_and_is_read_from_yaml(tmp_path):
    from splitserve.cluster.api.http_server import HEAD_TIMEOUT_S

    assert load_config(write(tmp_path, "{}\n")).endpoints.head_timeout_s == HEAD_TIMEOUT_S
    cfg = load_config(write(tmp_path, "endpoints: {http_server: ingress, head_timeout_s: 2.5}\n"))
    assert cfg.endpoints.head_timeout_s == 2.5


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "missing.yaml")
    assert str(e.value) == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"


def test_empty_file_is_refused_and_braces_are_the_default_cluster(tmp_path):
    # an empty file is what a failed `--print-config > cluster.yaml` leaves
    for text in ("", "# only a comment\n"):
        p = write(tmp_path, text)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert str(e.value) == (f"{p}: the file is empty (no YAML content); write '{{}}' for a "
                                "cluster of all the defaults")
    cfg = load_config(write(tmp_path, "{}\n"))
    assert [m.model.name for m in cfg.models] == ["default"]
    assert cfg.models[0].prefill.autoscaling.bottleneck == "compute"
    assert cfg.models[0].decode.autoscaling.bottleneck == "memory"


def test_config_changes_name_each_key_and_hide_secrets():
    old = parse_config({"models": [{"model": {"name": "a"}, "decode": {"max_replicas": 2}}],
                        "auth": {"cluster_token": "s3cret"}})
    new = parse_config({"models": [
        {"model": {"name": "a"}, "decode": {"max_replicas": 4, "autoscaling": {
            "bottleneck": "memory", "target_kv_usage": 0.6}}},
        {"model": {"name": "b"}}], "auth": {"cluster_token": "other"}})
    lines = config_changes(old, new)
    assert "models[a].decode.max_replicas: 2 -> 4" in lines
    # a section added is one line with what it sets beyond its defaults
    assert ("models[a].decode.autoscaling: added (bottleneck 'memory', target_kv_usage 0.6)"
            in lines)
    assert not any(line.startswith("models[a].decode.autoscaling.") for line in lines)
    assert "models[b]: added" in lines  # a model added whole: one line, not one per key
    assert not any(line.startswith("models[b].") for line in lines)
    assert config_changes(new, old)[-1] == "models[b]: removed"
    assert "auth.cluster_token: changed" in lines
    assert not any("s3cret" in line or "other" in line for line in lines)
    assert config_changes(new, new) == []
    assert config_changes(None, new) == ["(new cluster)"]


def parser():
    p = argparse.ArgumentParser(prog="splitserve")
    cli_ops.add_subcommands(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.parametrize("cmd,words", [("deploy", "apply it in place"),
                                       ("status", "latest autoscaling decision")])
def test_subcommand_help(capsys, cmd, words):
    with pytest.raises(SystemExit) as e:
        parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert words in out and "--address" in out


def test_deploy_refuses_an_invalid_file_before_connecting(tmp_path, capsys):
    p = write(tmp_path, "models:\n  - decode: {min_replicas: 3, max_replicas: 1}\n")
    args = parser().parse_args(["deploy", str(p), "--address", "127.0.0.1:1"])
    assert args.func(args) == 2
    assert capsys.readouterr().err == (
        f"error: {p}: models.0.decode (line 2, column 5): Value error, min_replicas (3) > max_replicas (1)\n")


def test_status_table():
    rows = [PoolStatus("m-prefill", "prefill", 2, 3, 1, 4, "compute", 1.234,
                       "12 pending tok, 900 tok/s", "scale up to 3 in 2.0s if it persists: x",
                       95.0, "scale up 1 -> 2: y", 40.0),
            PoolStatus("m-decode", "decode", 1, None, 1, 1, "fixed", None, "-", "-", None,
                       "-", None)]
    assert format_status("c", rows, 100.0).splitlines() == [
        "cluster c: 2 pool(s)",
        "POOL       ROLE     REPLICAS  BOUNDS  BOTTLENECK  VALUE  LOAD",
        "m-prefill  prefill  2/3       1-4     compute     1.23   12 pending tok, 900 tok/s",
        "m-decode   decode   1/-       1-1     fixed       -      -",
        "",
        "autoscaling decisions:",
        "  m-prefill: 5s ago: scale up to 3 in 2.0s if it persists: x",
        "             last change 60s ago: scale up 1 -> 2: y",
        "  m-decode: -",
    ]


@pytest.mark.parametrize("field,value,other", [("tool_call_parser", "mistral", "hermes"),
                                               ("reasoning_parser", "qwen3", "none")])
def test_ingress_parsers_reach_the_ingress_and_stay_out_of_replica_versions(
        tiny_checkpoints, field, value, other):
    from splitserve.cluster.serve.orchestrator import ClusterBackend
    from splitserve.cluster.config import PoolSpec, RouterSpec, TransferSpec
    from splitserve.cluster.serve.workers import worker_deployment
    from splitserve.engine.roles import Role

    path = tiny_checkpoints["llama"]
    cfg = parse_config({"models": [
        {"model": {"name": "a", "path": str(path), field: value}},
        {"model": {"name": "b", "path": str(path)}}]})
    backend = ClusterBackend(cfg, token="unit-test-token")
    setting = getattr(backend, field)
    assert (setting("a"), setting("b")) == (value, "auto")

    def built(parser):  # the worker pool's Serve deployment: its version and model argument
        spec = cfg.models[0].model.model_copy(update={field: parser})
        d = worker_deployment("a-decode", Role.DECODE, PoolSpec(), spec, TransferSpec(),
                              RouterSpec(), "token")._bound_deployment
        return d.version, d.init_args[1]
    (v1, model1), (v2, _) = built(value), built(other)
    assert v1 is not None and v1 == v2
    assert field not in model1 and model1["name"] == "a"


def test_each_mode_names_its_pools_by_role():
    from splitserve.cluster.config import ModelSpec, ServedModel
    from splitserve.cluster.serve.app import pool_apps_names
    from splitserve.engine.roles import Role

    dis = ServedModel(model=ModelSpec(name="m"))
    col = ServedModel(model=ModelSpec(name="c"), mode="colocated")
    assert (dis.roles(), col.roles()) == ((Role.PREFILL, Role.DECODE), (Role.COLOCATED,))
    assert (pool_apps_names(dis), pool_apps_names(col)) == (["m-prefill", "m-decode"],
                                                            ["c-colocated"])
    assert dis.pool(Role.PREFILL) is dis.prefill and dis.pool(Role.DECODE) is dis.decode
    assert col.pool(Role.COLOCATED) is col.decode
    # the router places from two pools: colocated replicas join the decode one
    assert [r.pool for r in Role] == [Role.PREFILL, Role.DECODE, Role.DECODE]


def test_the_router_section_is_the_router_config_under_the_same_names_and_defaults():
    import dataclasses

    from splitserve.cluster.config import RouterSpec
    from splitserve.router.config import ModelFacts, RouterConfig
    from splitserve.router.policies import POLICIES

    spec = RouterSpec()
    defaults = {f.name: f.default for f in dataclasses.fields(RouterConfig)}
    shared = set(RouterSpec.model_fields) - RouterSpec.NOT_ROUTER_FIELDS
    assert shared == {"policy", "max_queue_per_model", "stats_ttl_s", "network_bytes_per_s",
                      "local_prefill_max_tokens", "max_queue_delay_s", "max_resume_wait_s",
                      "no_replica_grace_s", "lease_ttl_s", "expected_output_tokens",
                      "output_tokens_quantile",
                      "adapter_miss_weight", "adapter_load_s"}
    assert {k: getattr(spec, k) for k in shared} == {k: defaults[k] for k in shared}
    assert spec.router_config({}) == RouterConfig()
    assert RouterSpec.model_fields["policy"].annotation.__args__ == tuple(POLICIES)
    facts = {"m": ModelFacts(block_size=32, kv_bytes_per_token=4096)}
    cfg = parse_config({"router": {"network_bytes_per_s": 2e9, "max_retries": 5}})
    assert cfg.router.router_config(facts) == RouterConfig(models=facts, network_bytes_per_s=2e9)


def test_router_config_takes_each_models_facts_from_that_model(tiny_checkpoints):
    from splitserve.cluster.serve.app import router_config
    from splitserve.engine.loader import load_checkpoint
    from splitserve.router.config import ModelFacts

    path = tiny_checkpoints["llama"]
    mc = load_checkpoint(path).model_config
    per_elem = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim
    cfg = parse_config({"models": [
        {"model": {"name": "a", "path": str(path), "block_size": 32}},
        {"model": {"name": "b", "path": str(path), "block_size": 8, "dtype": "bfloat16"}},
        {"model": {"name": "c", "path": str(path), "kv_cache_dtype": "fp8"}}]})
    assert router_config(cfg).models == {
        "a": ModelFacts(block_size=32, kv_bytes_per_token=4 * per_elem),  # auto: as float32
        "b": ModelFacts(block_size=8, kv_bytes_per_token=2 * per_elem),
        "c": ModelFacts(block_size=16, kv_bytes_per_token=per_elem)}


def test_a_pool_overrides_the_models_engine_settings_for_its_replicas():
    from splitserve.cluster.serve.app import pool_apps
    from splitserve.engine.roles import Role

    cfg = parse_config({"models": [{
        "model": {"name": "m", "max_num_seqs": 16, "max_num_batched_tokens": 512, "num_blocks": 64},
        "prefill": {"engine": {"max_num_seqs": 2, "max_num_batched_tokens": 4096,
                               "enforce_eager": True}},
        "decode": {"engine": {"max_num_seqs": 64, "kv_cache_memory_gb": 2.0}}}]})
    served = cfg.models[0]
    pre, dec = served.engine_spec(Role.PREFILL), served.engine_spec(Role.DECODE)
    assert (pre.max_num_seqs, pre.max_num_batched_tokens, pre.num_blocks, pre.enforce_eager) \
        == (2, 4096, 64, True)
    # a pool sizing its KV by memory drops the model's block count
    assert (dec.max_num_seqs, dec.max_num_batched_tokens, dec.num_blocks,
            dec.kv_cache_memory_gb, dec.enforce_eager) == (64, 512, None, 2.0, False)
    assert served.model.max_num_seqs == 16  # the model's own spec is unchanged
    apps = pool_apps(served, cfg, "v1")
    built = {app: bound._bound_deployment.init_args[1] for app, (_, bound) in apps.items()}
    assert built["m-prefill"]["max_num_seqs"] == 2 and built["m-decode"]["max_num_seqs"] == 64
    colocated = parse_config({"models": [{"model": {"name": "c"}, "mode": "colocated",
                                          "decode": {"engine": {"max_num_seqs": 7}}}]}).models[0]
    assert colocated.engine_spec(Role.COLOCATED).max_num_seqs == 7
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        parse_config({"models": [{"decode": {"engine": {"max_num_batched_tokens": 4}}}]})


def test_pools_pick_their_own_tensor_parallel_degree_and_reserve_per_rank(tiny_checkpoints):
    from splitserve.cluster.serve.app import check_tensor_parallel, pool_apps
    from splitserve.engine.roles import Role

    path = str(tiny_checkpoints["llama"])  # 4 attention heads, 2 KV heads
    cfg = parse_config({"models": [{
        "model": {"name": "m", "path": path, "tensor_parallel_size": 2},
        "prefill": {"num_cpus": 1.5, "engine": {"tensor_parallel_size": 4}},
        "decode": {"num_cpus": 2, "num_gpus": 1}}]})
    served = cfg.models[0]
    assert served.engine_spec(Role.PREFILL).tensor_parallel_size == 4
    assert served.engine_spec(Role.DECODE).tensor_parallel_size == 2
    check_tensor_parallel(cfg)  # 4 and 2 both split 4 heads (KV heads replicated at 4)
    apps = pool_apps(served, cfg, "v1")
    opts = {app: bound._bound_deployment.ray_actor_options for app, (_, bound) in apps.items()}
    assert (opts["m-prefill"]["num_cpus"], opts["m-prefill"]["num_gpus"]) == (6.0, 0.0)
    assert (opts["m-decode"]["num_cpus"], opts["m-decode"]["num_gpus"]) == (4, 2)
    built = {app: bound._bound_deployment.init_args[1] for app, (_, bound) in apps.items()}
    assert built["m-prefill"]["tensor_parallel_size"] == 4
    bad = parse_config({"models": [{"model": {"name": "m", "path": path},
                                    "decode": {"engine": {"tensor_parallel_size": 3}}}]})
    with pytest.raises(ConfigError, match="model 'm', decode pool: .*num_attention_heads "
                                          r"\(4\) is not a multiple"):
        check_tensor_parallel(bad)
    with pytest.raises(ConfigError, match="num_gpus counts per rank"):
        parse_config({"models": [{"model": {"tensor_parallel_size": 2},
                                  "decode": {"num_gpus": 0.5}}]})
    # LoRA adapters split across ranks with their projections (max_loras is no refusal)
    lora = {"name": "m", "path": path, "tensor_parallel_size": 2, "max_loras": 2}
    check_tensor_parallel(parse_config({"models": [{"model": lora}]}))


def test_speculative_settings_reach_decode_engines_only():
    from splitserve.cluster.serve.workers import speculative_config
    from splitserve.engine.roles import Role

    cfg = parse_config({"models": [{"model": {"speculative": {
        "method": "ngram", "num_speculative_tokens": 6, "ngram_max": 5,
        "disable_batch_size": 16}}}]})
    spec = cfg.models[0].model
    got = speculative_config(spec, Role.DECODE)
    assert (got.method, got.num_speculative_tokens, got.ngram_min, got.ngram_max,
            got.disable_batch_size, got.adaptive) == ("ngram", 6, 1, 5, 16, True)
    assert speculative_config(spec, Role.COLOCATED) == got
    assert speculative_config(spec, Role.PREFILL) is None
    assert speculative_config(parse_config({}).models[0].model, Role.DECODE) is None


def test_a_pool_rebuild_surges_one_replica_unless_the_operator_turns_it_off(tiny_checkpoints):
    from splitserve.cluster.config import PoolSpec, RouterSpec, TransferSpec
    from splitserve.cluster.serve.workers import worker_deployment
    from splitserve.engine.roles import Role

    spec = parse_config({"models": [{"model": {"name": "a", "path": str(
        tiny_checkpoints["llama"])}}]}).models[0].model

    def surge(pool: PoolSpec) -> int:
        d = worker_deployment("a-decode", Role.DECODE, pool, spec, TransferSpec(), RouterSpec(),
                              "token")._bound_deployment
        return d._deployment_config.max_surge_percent

    assert surge(PoolSpec()) == 1  # one extra replica for pools of up to 100
    assert surge(PoolSpec(rollout_surge=False)) == 0  # Serve's default: old ones stop first
