"""The plan's data: every host and process with its command line and environment (topology/plan.py
makes it, the launcher runs it, `disaggctl plan` prints it)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, computed_field

from disaggctl.topology.schema import Keeper, RestartPolicy, SshSettings


class HostSpec(BaseModel):
    name: str
    address: str
    gpus: int
    nics: list[str]
    local: bool
    backend: str  # local | ssh unless the topology names another (launch/backend.py)
    ssh: SshSettings | None = None
    python: str
    run_dir: str | None = None


class ProcessSpec(BaseModel):
    name: str
    role: Literal["encoder", "prefill", "decode", "colocated", "proxy"]
    replica: int
    host: str
    address: str
    bind: str
    gpus: list[int]
    base_gpu_id: int | None
    nics: list[str]
    tp: int
    dp: int
    ep: int
    port: int
    bootstrap_port: int | None
    argv: list[str]
    env: dict[str, str]
    health_path: str = "/health"
    # not in the spec hash: a new policy takes effect without restarting the process
    restart: RestartPolicy = "on-failure"

    @computed_field
    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


class Plan(BaseModel):
    name: str
    engine: Literal["embedded", "sglang"]
    kind: Literal["xpyd", "epd", "ep", "colocated"]
    source: str
    hosts: list[HostSpec]
    processes: list[ProcessSpec]
    keeper: Keeper = Keeper()
    # engine sglang: the SGLang release the commands are rendered for (pre-flight compares the hosts')
    sglang_version: str | None = None

    def process(self, name: str) -> ProcessSpec:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(f"no process {name!r} in plan {self.name}")

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in plan {self.name}")

    def spec_hash(self, name: str) -> str:
        """What `up` compares to decide whether a running process still matches the plan."""
        p = self.process(name)
        h = self.host(p.host)
        doc = {
            "argv": p.argv,
            "env": p.env,
            "host": [h.name, h.address, h.python],
            "bind": p.bind,
            "port": p.port,
            "bootstrap_port": p.bootstrap_port,
            "gpus": p.gpus,
            "nics": p.nics,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
