"""Every command engine: sglang renders parses against the options of the SGLang release it is rendered
for, as snapshotted from the release's wheel (disaggctl/data, scripts/extract_sglang_args.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from disaggctl.topology.load import load_topology
from disaggctl.topology.plan import build_plan
from disaggctl.topology.sglang_args import (
    PINNED_ROUTER,
    PINNED_SGLANG,
    check_argv,
    check_command,
    snapshot,
    version_key,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "topologies").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[f.stem for f in EXAMPLES])
def test_every_example_renders_commands_the_pinned_release_parses(path):
    topology = load_topology(path)
    if topology.engine != "sglang":
        # `plan --engine sglang` draws every example for SGLang too
        topology = topology.model_copy(update={"engine": "sglang"})
    plan = build_plan(topology, str(path))
    assert plan.sglang_version == PINNED_SGLANG
    checked = 0
    for p in plan.processes:
        found = check_command(p.argv, PINNED_SGLANG)
        if p.argv[2].startswith("sglang"):
            assert found is not None, p.argv
            label, problems = found
            assert problems == [], (p.name, label, problems, p.argv)
            checked += 1
        else:
            assert p.role == "proxy" and p.argv[2] == "disaggctl"  # least_load: disaggctl's own proxy
    assert checked >= len(plan.processes) - 1


def test_guides_scenarios_parse(tmp_path):
    # the shapes tests/test_sglang_render.py pins to the guides, all parsed here too (plan-time check
    # aside): router PD, router over colocated workers, EP with NIC maps, EPD, and the old mini_lbs
    cases = {
        None: "prefill: {tp: 2, dp: 2, ep: 2}\ndecode: {tp: 2}\n",
        "0.5.21": "prefill: {tp: 2, dp: 2}\ndecode: {}\n",
        "0.5.1": "prefill: {replicas: 2}\ndecode: {replicas: 2}\n",
        "0.4.6": "prefill: {replicas: 2}\ndecode: {}\n",
    }
    host = "hosts: [{name: n, address: 10.0.0.1, gpus: 8, nics: [m0, m1, m2, m3]}]\n"
    for version, roles in cases.items():
        pin = f"sglang: {{version: {version}}}\n" if version else ""
        text = f"name: g\nengine: sglang\n{pin}model: {{path: m/m, multimodal: true}}\n{host}{roles}"
        (tmp_path / "t.yaml").write_text(text)
        plan = build_plan(load_topology(tmp_path / "t.yaml"), "t")
        for p in plan.processes:
            label, problems = check_command(p.argv, version or PINNED_SGLANG)
            assert problems == [], (version, p.name, problems)
            assert label == (
                f"sglang_router {PINNED_ROUTER}"
                if "router" in p.argv[2]
                else f"SGLang {version or PINNED_SGLANG}"
            )
    text = f"name: g\nengine: sglang\nmodel: {{path: m/m, multimodal: true}}\n{host}encoder: {{}}\ncolocated: {{}}\n"
    (tmp_path / "t.yaml").write_text(text)
    for p in build_plan(load_topology(tmp_path / "t.yaml"), "t").processes:
        assert check_command(p.argv, PINNED_SGLANG)[1] == [], p.argv


def test_check_argv_reads_like_argparse():
    options = {
        "--a": {"nargs": 1},
        "--flag": {"nargs": 0},
        "--many": {"nargs": "+"},
        "--maybe": {"nargs": "?"},
        "--n": {"nargs": 1},
    }
    assert (
        check_argv(["--a", "x", "--flag", "--many", "u", "v", "--maybe", "--n", "-1", "--a=y"], options) == []
    )
    assert check_argv(["--b", "x"], options) == ["--b is not an option"]
    assert check_argv(["--flag", "x"], options) == [
        "'x' is not an option and follows no option that takes it"
    ]
    assert check_argv(["--flag=x"], options) == ["--flag takes no value, got 'x'"]
    assert check_argv(["--a"], options) == ["--a takes 1 value, got 0"]
    assert check_argv(["--a", "x", "y"], options) == [
        "'y' is not an option and follows no option that takes it"
    ]
    assert check_argv(["--many", "--flag"], options) == ["--many takes one or more values, got none"]
    assert check_argv(["--fl"], options) == ["--fl is not an option"]  # no abbreviations


def test_snapshots_of_the_pinned_releases_ship():
    server = snapshot("sglang", PINNED_SGLANG)["sglang.launch_server"]
    assert server["--disaggregation-ib-device"]["nargs"] == 1
    assert server["--encoder-only"]["nargs"] == 0 and server["--encoder-urls"]["nargs"] == "+"
    assert "sglang.srt.disaggregation.mini_lb" not in snapshot("sglang", PINNED_SGLANG)
    router = snapshot("sglang-router", PINNED_ROUTER)["sglang_router.launch_router"]
    assert router["--prefill"]["nargs"] == "+" and router["--decode"]["nargs"] == 1
    assert router["--pd-disaggregation"]["nargs"] == 0
    # the mini_lb forms: comma-joined values, then space-separated lists
    assert snapshot("sglang", "0.4.6")["sglang.srt.disaggregation.mini_lb"]["--prefill"]["nargs"] == 1
    assert snapshot("sglang", "0.5.1")["sglang.srt.disaggregation.mini_lb"]["--prefill"]["nargs"] == "+"
    assert "--attn-dp-size" not in snapshot("sglang", "0.5.21")["sglang.launch_server"]
    assert snapshot("sglang", "0.0.1") is None
    assert version_key("0.4.6.post3") > version_key("0.4.6") and version_key("0.5.10") > version_key("0.5.9")


FIELDS = """
import argparse
from typing import List, Literal, Optional
from sglang.srt.arg_groups.arg_utils import A, Arg, NS

class Serving:
    _NS_PATH = "serving"
    host: A[str, "The host."] = "127.0.0.1"
    tp_size: A[int, Arg(help="TP.", aliases=["--tensor-parallel-size"])] = 1
    mode: A[Literal["null", "prefill"], "Mode."] = "null"
    urls: A[List[str], "URLs."] = None
    verbose: A[bool, "Talk."] = False
    ratio: A[Optional[float], NS("x"), "Ratio."] = None
    hidden: A[bool, Arg(no_cli=True)] = False
    renamed: A[int, Arg(help="x", cli_name="--other-name")] = 3
    both: A[Optional[bool], Arg(help="x", action=argparse.BooleanOptionalAction)] = None
    parsed: A[Optional[List[str]], Arg(help="x", type_parser=str)] = None
    derived = object()
"""
SERVER_ARGS = """
import argparse
from sglang.srt.arg_groups.argparse_actions import OldSwitch

def add_cli_args(parser):
    parser.add_argument("--legacy", type=int, default=4)
    parser.add_argument("--old-switch", action=OldSwitch)
    parser.add_argument("--old-valued", action=OldSwitch, nargs=None)
    parser.add_argument("--store", action="store_true")
"""
ACTIONS = """
import argparse

class OldSwitch(argparse.Action):
    def __init__(self, option_strings, dest, nargs=0, **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)
"""
MINI_LB = """
import argparse
if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefill", required=True)
    parser.add_argument("--decode", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
"""


def test_extractor_reads_both_declaration_styles(tmp_path):
    wheel = tmp_path / "sglang-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("sglang/srt/server_args.py", SERVER_ARGS)
        z.writestr("sglang/srt/arg_groups/fields/serving.py", FIELDS)
        z.writestr("sglang/srt/arg_groups/argparse_actions.py", ACTIONS)
        z.writestr("sglang/srt/disaggregation/mini_lb.py", MINI_LB)
    # a real release always has these; the fake one declares them so the sanity check passes
    extra = """
    model_path: A[str, "Model."] = None
    port: A[int, "Port."] = 30000
    disaggregation_mode: A[str, "Mode."] = "null"
"""
    with zipfile.ZipFile(wheel, "a") as z:
        z.writestr(
            "sglang/srt/arg_groups/fields/extra.py", FIELDS.split("class Serving")[0] + "class X:\n" + extra
        )
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "extract_sglang_args.py"), "--sglang", "9.9.9",
         "--sglang-wheel", str(wheel), "--out", str(out)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    doc = json.loads((out / "sglang-args-9.9.9.json").read_text())
    server = doc["commands"]["sglang.launch_server"]
    expect = {
        "--host": {"nargs": 1, "default": "127.0.0.1"},
        "--tp-size": {"nargs": 1, "default": 1},
        "--tensor-parallel-size": {"nargs": 1, "default": 1},
        "--mode": {"nargs": 1, "default": "null"},
        "--urls": {"nargs": "+", "default": None},
        "--verbose": {"nargs": 0, "default": False},
        "--ratio": {"nargs": 1, "default": None},
        "--other-name": {"nargs": 1, "default": 3},
        "--both": {"nargs": 0, "default": None},
        "--no-both": {"nargs": 0},
        "--parsed": {"nargs": 1, "default": None},
        "--legacy": {"nargs": 1, "default": 4},
        "--old-switch": {"nargs": 0},
        "--old-valued": {"nargs": 1},
        "--store": {"nargs": 0},
    }
    for name, entry in expect.items():
        assert server[name] == entry, name
    assert "--hidden" not in server and "--renamed" not in server and "--derived" not in server
    assert doc["commands"]["sglang.srt.disaggregation.mini_lb"]["--prefill"] == {"nargs": 1}
