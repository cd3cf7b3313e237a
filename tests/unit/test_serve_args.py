"""``splitserve serve [MODEL] [flags]``: flags override the config file key by
key, --print-config prints a file that parses back to the same cluster."""

import argparse

import pytest
import yaml

from splitserve.cluster.cli.main import build_parser, main
from splitserve.cluster.cli.serve_args import config_from_args, config_yaml
from splitserve.cluster.config import ConfigError, load_config, parse_config


def args_of(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_model_and_vllm_flags_set_the_one_model():
    cfg = config_from_args(args_of(
        "org/tiny", "--revision", "v2", "--max-model-len", "512", "--dtype", "half",
        "--kv-cache-dtype", "fp8_e4m3", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
        "--block-size", "32", "--device", "cpu", "--tool-call-parser", "hermes",
        "--no-enable-prefix-caching", "--chat-template", "{{ messages[0].content }}",
        "--reasoning-parser", "qwen3", "--quantization", "fp8"))
    m = cfg.models[0].model
    assert (m.name, m.path, m.revision) == ("org/tiny", "org/tiny", "v2")
    assert (m.max_model_len, m.dtype, m.kv_cache_dtype) == (512, "float16", "fp8")
    assert (m.max_num_seqs, m.max_num_batched_tokens, m.block_size) == (8, 256, 32)
    assert (m.device, m.tool_call_parser, m.enable_prefix_caching) == ("cpu", "hermes", False)
    assert m.chat_template == "{{ messages[0].content }}" and m.reasoning_parser == "qwen3"
    assert m.weight_dtype == "fp8"


def test_served_model_name_endpoints_keys_pools_and_transport():
    cfg = config_from_args(args_of(
        "/ckpt", "--served-model-name", "chat", "--host", "0.0.0.0", "--port", "9000",
        "--grpc-port", "9001", "--api-key", "k1", "--api-key", "k2", "--mode", "disaggregated",
        "--decode-replicas", "3", "--prefill-replicas", "2", "--transport", "torch_dist",
        "--http-server", "ingress"))
    served = cfg.models[0]
    assert (served.model.name, served.model.path, served.mode) == ("chat", "/ckpt", "disaggregated")
    assert (served.decode.min_replicas, served.decode.max_replicas, served.decode.autoscaling) \
        == (3, 3, None)
    assert (served.prefill.min_replicas, served.prefill.max_replicas) == (2, 2)
    assert (cfg.endpoints.host, cfg.endpoints.http_port, cfg.endpoints.grpc_port) == \
        ("0.0.0.0", 9000, 9001)
    assert cfg.endpoints.http_server == "ingress"
    assert cfg.auth.api_keys == ["k1", "k2"] and cfg.transfer.transport == "torch_dist"


def test_flags_override_the_file_and_leave_its_other_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "name": "mine", "router": {"policy": "least_loaded"},
        "models": [{"model": {"name": "a", "path": "/x", "max_num_seqs": 4},
                    "decode": {"min_replicas": 1, "max_replicas": 5,
                               "autoscaling": {"bottleneck": "memory"}}}]}))
    cfg = config_from_args(args_of("--config", str(f), "--max-num-seqs", "16"))
    assert cfg.name == "mine" and cfg.router.policy == "least_loaded"
    m = cfg.models[0]
    assert (m.model.name, m.model.path, m.model.max_num_seqs) == ("a", "/x", 16)
    assert m.decode.max_replicas == 5 and m.decode.autoscaling.bottleneck == "memory"
    assert config_from_args(args_of("--config", str(f))) == load_config(f)


def test_model_flags_are_refused_for_a_config_of_several_models(tmp_path):
    f = tmp_path / "two.yaml"
    f.write_text(yaml.safe_dump({"models": [{"model": {"name": "a"}}, {"model": {"name": "b"}}]}))
    assert len(config_from_args(args_of("--config", str(f), "--port", "9")).models) == 2
    with pytest.raises(ConfigError, match="serves 2 models"):
        config_from_args(args_of("--config", str(f), "--max-model-len", "64"))


@pytest.mark.parametrize("argv, message", [
    (("--tensor-parallel-size", "0"), "--tensor-parallel-size must be at least 1"),
    (("--decode-replicas", "0"), "--decode-replicas must be from 1 to 10000, got 0"),
    (("--block-size", "24"), "block_size must be a power of two"),
    (("--port", "70000"), "endpoints.http_port"),
    (("--port", "0", "--http-server", "ingress"), "set a fixed http_port"),
])
def test_bad_flags_name_what_to_fix(argv, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args(args_of(*argv))


def test_print_config_round_trips_to_the_same_cluster(tmp_path, capsys):
    argv = ["serve", "/models/tiny", "--served-model-name", "tiny", "--api-key", "sk-1",
            "--decode-replicas", "2", "--max-model-len", "256", "--print-config"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "keep it private" in text
    f = tmp_path / "printed.yaml"
    f.write_text(text)
    expected = config_from_args(build_parser().parse_args(argv))
    assert load_config(f) == expected
    assert parse_config(yaml.safe_load(config_yaml(expected))) == expected


def test_bad_flag_exits_2_with_the_reason(capsys):
    assert main(["serve", "--tensor-parallel-size", "0", "--print-config"]) == 2
    assert "tensor-parallel-size must be at least 1" in capsys.readouterr().err


def test_tensor_parallel_size_sets_the_model_and_its_replicas_resources(tmp_path, capsys):
    cfg = config_from_args(args_of("/models/tiny", "-tp", "2"))
    served = cfg.models[0]
    assert served.model.tensor_parallel_size == 2
    for role in served.roles():
        assert served.engine_spec(role).tensor_parallel_size == 2
        assert served.pool(role).ray_actor_options(2)["num_cpus"] == 2 * served.pool(role).num_cpus
    assert main(["serve", "/models/tiny", "-tp", "2", "--print-config"]) == 0
    assert "tensor_parallel_size: 2" in capsys.readouterr().out


def test_serving_beyond_loopback_without_a_key_is_refused(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--print-config"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--api-key", "k", "--print-config"]) == 0
