"""Topology schema and loading: defaults, and every error as `FILE:LINE: field.path: message`."""

from __future__ import annotations

import re

import pytest

from disaggctl.topology.load import TopologyError, load_topology
from disaggctl.topology.schema import Topology

GOOD = """\
name: demo
model: {path: builtin:tiny}
hosts:
  - {name: node0, address: 127.0.0.1}
prefill: {replicas: 1}
decode: {replicas: 1}
"""


def write(tmp_path, text: str, name: str = "topo.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(tmp_path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as exc:
        load_topology(path)
    lines = str(exc.value).splitlines()
    for line in lines:  # every line names the file
        assert line.startswith(f"{path}:"), line
    return lines


def line_no(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle` (computed from the text, not hand-counted)."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_defaults():
    t = Topology.model_validate({"name": "x", "model": {"path": "builtin:tiny"}, "colocated": {}})
    assert t.engine == "embedded"
    assert t.model.dtype == "auto" and t.model.multimodal == "auto"
    assert [(h.name, h.address, h.gpus, h.nics) for h in t.hosts] == [("local", "127.0.0.1", 0, [])]
    assert t.transfer.backend == "mooncake" and t.transfer.protocol == "auto" and t.transfer.timeout_s == 30
    r = t.colocated
    assert (r.replicas, r.tp, r.dp, r.ep, r.hosts, r.port, r.bind, r.extra_args, r.env) == (
        1, 1, 1, 1, None, None, None, [], {},
    )  # fmt: skip
    assert (t.proxy.port, t.proxy.policy, t.proxy.use, t.proxy.bind) == (8000, "round_robin", "auto", None)


def test_good_file_loads(tmp_path):
    t = load_topology(write(tmp_path, GOOD))
    assert t.name == "demo" and t.prefill.replicas == 1 and t.hosts[0].name == "node0"


def test_env_values_become_strings(tmp_path):
    t = load_topology(write(tmp_path, GOOD + "colocated: {env: {A: 1, B: true, C: x, D: 0.5}}\n"))
    assert t.colocated.env == {"A": "1", "B": "1", "C": "x", "D": "0.5"}


def test_bad_value_names_file_line_and_field(tmp_path):
    text = GOOD.replace("prefill: {replicas: 1}", "prefill: {replicas: two}")
    (line,) = errors(tmp_path, text)
    assert re.fullmatch(rf".*:{line_no(text, 'replicas: two')}: prefill\.replicas: .*integer.*'two'.*", line)


def test_nested_list_field_path(tmp_path):
    text = GOOD.replace("address: 127.0.0.1}", "address: 127.0.0.1,\n      gpus: -1}")
    (line,) = errors(tmp_path, text)
    assert f":{line_no(text, 'gpus: -1')}: hosts[0].gpus: " in line and "greater than or equal to 0" in line


def test_unknown_field(tmp_path):
    text = GOOD + "proxy:\n  port: 8000\n  polcy: random\n"
    (line,) = errors(tmp_path, text)
    assert line.endswith(f":{line_no(text, 'polcy')}: proxy.polcy: unknown field")


def test_missing_field_points_at_its_parent(tmp_path):
    text = GOOD.replace("model: {path: builtin:tiny}", "model: {dtype: auto}")
    (line,) = errors(tmp_path, text)
    assert line.endswith(f":{line_no(text, 'model:')}: model.path: required field is missing")


def test_union_field_is_one_line(tmp_path):
    text = GOOD.replace("{path: builtin:tiny}", "{path: builtin:tiny, multimodal: maybe}")
    (line,) = errors(tmp_path, text)
    assert "model.multimodal:" in line and "boolean" in line and "'auto'" in line


def test_several_errors_are_all_reported(tmp_path):
    text = GOOD.replace("replicas: 1}\ndecode", "replicas: 0}\ndecode").replace(
        "decode: {replicas: 1}", "decode: {replicas: 1, tp: x}"
    )
    lines = errors(tmp_path, text)
    assert len(lines) == 2
    assert any(f":{line_no(text, 'replicas: 0')}: prefill.replicas: " in x for x in lines)
    assert any(f":{line_no(text, 'tp: x')}: decode.tp: " in x for x in lines)


def test_zero_replicas_rejected(tmp_path):
    (line,) = errors(tmp_path, GOOD.replace("prefill: {replicas: 1}", "prefill: {replicas: 0}"))
    assert "prefill.replicas:" in line and "greater than or equal to 1" in line


def test_yaml_syntax_error_has_line(tmp_path):
    text = GOOD + "decode: [unclosed\nproxy: {port: 1}\n"
    (line,) = errors(tmp_path, text)
    m = re.match(rf"{re.escape(str(tmp_path))}/topo.yaml:(\d+): YAML syntax error: ", line)
    assert m, line
    assert int(m.group(1)) >= line_no(text, "[unclosed")


def test_duplicate_key(tmp_path):
    text = GOOD + "prefill: {replicas: 3}\n"
    (line,) = errors(tmp_path, text)
    assert line.endswith(
        f":{line_no(text, 'replicas: 3')}: prefill: duplicate key (YAML would silently keep only the last one)"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "must be a YAML mapping"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("name: x\nmodel: {path: builtin:tiny}\n", "no role"),
        ("name: 'bad name'\nmodel: {path: builtin:tiny}\ncolocated: {}\n", "name:"),
        ("name: x\nmodel: {path: builtin:tiny}\nhosts: []\ncolocated: {}\n", "at least one host"),
        ("name: x\nmodel: {path: builtin:tiny}\ncolocated: {env: {'1X': a}}\n", "not a valid environment"),
        (
            "name: x\nmodel: {path: builtin:tiny}\nhosts: [{name: a, address: b, nics: ['m 1']}]\ncolocated: {}\n",
            "NIC name",
        ),
        (
            "name: x\nmodel: {path: builtin:tiny}\ntransfer: {timeout_s: 0}\ncolocated: {}\n",
            "transfer.timeout_s",
        ),
        ("name: x\nmodel: {path: builtin:tiny}\nproxy: {policy: fastest}\ncolocated: {}\n", "proxy.policy"),
    ],
)
def test_rejected_files(tmp_path, text, message):
    lines = errors(tmp_path, text)
    assert any(message in line for line in lines), lines


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(TopologyError, match="no such file"):
        load_topology(tmp_path / "nope.yaml")
    with pytest.raises(TopologyError, match="is a directory"):
        load_topology(tmp_path)
