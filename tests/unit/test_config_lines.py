"""An operator file's validation errors name the line (and column) of the key
at fault; a missing key names its parent mapping's line; configs built from
dicts keep the key-path-only messages."""

import pytest

from splitserve.cluster.config import ConfigError, load_config, parse_config

LONG = """\
# A cluster of two models.
name: lines

models:
  - model:
      name: first
    prefill:
      min_replicas: 1
      max_replicas: 2

  - model:
      name: second
      max_loras: 2
      adapters:
        - name: sql
          # the path is missing
    decode:
      min_replicas: 1
      max_replicas: 0
      max_replica: 3
router:
  policy: prefix_aware
"""


def refused(tmp_path, text: str) -> str:
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    prefix = f"{p}: "
    assert str(e.value).startswith(prefix)
    return str(e.value)[len(prefix):]


def test_each_error_names_its_line_and_a_missing_key_its_parent(tmp_path):
    assert refused(tmp_path, LONG).split("; ") == [
        "models.1.model.adapters.0.path (line 15, column 11): Field required",
        "models.1.decode.max_replicas (line 19, column 7): Input should be greater than or "
        "equal to 1",
        "models.1.decode.max_replica (line 20, column 7): Extra inputs are not permitted "
        "(did you mean 'max_replicas'?)",
    ]


def test_a_missing_section_key_names_the_section(tmp_path):
    text = "transfer:\n  tls:\n    cert: c.pem\n    key: k.pem\n"
    assert refused(tmp_path, text) == "transfer.tls.ca (line 2, column 3): Field required"


def test_merged_keys_name_the_line_they_are_written_on(tmp_path):
    text = ("defaults: &pool\n"
            "  max_replicas: -1\n"
            "models:\n"
            "  - decode:\n"
            "      <<: *pool\n"
            "      min_replicas: 1\n")
    # 'defaults' is no key of the file; the merged max_replicas sits on line 2.
    assert refused(tmp_path, text).split("; ") == [
        "models.0.decode.max_replicas (line 2, column 3): Input should be greater than or "
        "equal to 1",
        "defaults (line 1, column 1): Extra inputs are not permitted",
    ]


def test_a_repeated_key_is_refused_at_its_second_line(tmp_path):
    # YAML keeps the last silently: an edit below a forgotten value would win unseen
    text = "router:\n  policy: cost\n  policy: random\n"
    assert refused(tmp_path, text) == (
        "invalid YAML: line 3, column 3: 'policy' appears twice (lines 2 and 3); YAML would "
        "keep the second silently: keep one")


def test_a_whole_file_problem_has_no_line(tmp_path):
    text = "models:\n  - model: {name: a}\n  - model: {name: a}\n"
    assert refused(tmp_path, text) == (
        "(top level): Value error, model names must be unique; repeated: ['a']")


def test_a_config_from_a_dict_keeps_the_key_path_message():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"decode": {"max_replicas": 0}}]}, "command line")
    assert str(e.value) == ("command line: models.0.decode.max_replicas: Input should be "
                            "greater than or equal to 1")
