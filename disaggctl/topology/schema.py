"""The topology file as pydantic models: every field, its default and its bounds (docs/topology.md).

Unknown keys are errors (`extra="forbid"`), so a misspelt field never silently falls back to a default.
Cross-field rules that need the whole file (placement, ports, role combinations) live in plan.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ROLES = ("encoder", "prefill", "decode", "colocated")
RESTART_POLICIES = ("no", "on-failure", "always")
RestartPolicy = Literal["no", "on-failure", "always"]


def _restart_text(value: object) -> object:
    # YAML 1.1 reads a bare `no` as false (docker compose has the same trap): take it as meant
    return "no" if value is False else value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SshSettings(Strict):
    user: str | None = None
    port: int = Field(22, ge=1, le=65535)
    key: str | None = None
    known_hosts: str | None = None
    jump: str | None = None  # [user@]address[:port]
    keepalive_s: float = Field(15.0, ge=0)
    insecure_accept_new_host_keys: bool = False


class Host(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    address: str = Field(min_length=1)
    gpus: int = Field(0, ge=0)  # 0: a CPU-only host
    nics: list[str] = []
    ssh: SshSettings | None = None
    python: str | None = None
    run_dir: str | None = None
    # the launch backend that reaches the host (launch/backend.py's REGISTRY); default: local for
    # this machine's addresses, ssh for any other
    backend: str | None = Field(None, pattern=NAME_PATTERN)

    @field_validator("nics")
    @classmethod
    def _nic_names(cls, nics: list[str]) -> list[str]:
        for nic in nics:
            if not nic or "," in nic or any(c.isspace() for c in nic):
                raise ValueError(f"NIC name {nic!r} must be one device name, without commas or spaces")
        if len(set(nics)) != len(nics):
            raise ValueError("a NIC is listed twice")
        return nics


class Model(Strict):
    path: str = Field(min_length=1)  # local HF directory (on every host that runs it) or builtin:NAME
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    served_name: str | None = None
    # "auto": true only for a local directory whose config.json has a `vision_config` (plan.py)
    multimodal: bool | Literal["auto"] = "auto"
    max_model_len: int | None = Field(None, ge=1)


class Transfer(Strict):
    backend: Literal["mooncake"] = "mooncake"
    protocol: Literal["auto", "tcp", "rdma", "nvlink"] = "auto"
    # Bounds one KV hand-off; also sets Mooncake's MC_TRANSFER_TIMEOUT and TCP progress/status timeouts.
    timeout_s: float = Field(30.0, gt=0, le=3600)


class Role(Strict):
    replicas: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    # how an ep > 1 server exchanges tokens between experts' ranks: mooncake (Mooncake's EP buffer and
    # process group; SGLang's --moe-a2a-backend mooncake) or none; unset: SGLang renders mooncake for
    # ep > 1 (the guide's), the embedded runtime combines with its all-reduce
    moe_a2a_backend: Literal["mooncake", "none"] | None = None
    hosts: list[str] | None = None  # default: every host, in file order
    max_per_host: int | None = Field(None, ge=1)
    gpus_per_replica: int | None = Field(None, ge=1)  # default: tp
    base_gpu_id: int | None = Field(None, ge=0)  # pin replicas to GPUs from this index on each host
    nics: list[str] | None = None  # replaces the host's NIC list for this role's GPU -> NIC mapping
    port: int | None = Field(None, ge=1, le=65535)  # HTTP port of the first replica on each host
    port_step: int = Field(1, ge=1, le=1000)
    bootstrap_port: int | None = Field(None, ge=1, le=65535)  # prefill only: first bootstrap port per host
    bind: str | None = None
    extra_args: list[str] = []
    env: dict[str, str] = {}
    # embedded runtime knobs (unset: the engine's default)
    # unset: the engine's own (the embedded runtime's one default is EngineConfig.page_size; SGLang picks
    # by attention backend). Checked here as the file's type, at plan time; EngineConfig.validate is the
    # runtime's one check, which a server's command line passes before loading anything.
    page_size: int | None = Field(None, ge=1)
    max_pages: int | None = Field(None, ge=1)
    max_batch: int | None = Field(None, ge=1)
    chunk_size: int | None = Field(None, ge=1)
    cuda_graph: bool | None = None  # false: decode steps run eagerly (SGLang: --disable-cuda-graph)
    # false: each step's tokens are read back before the next is queued (SGLang: --disable-overlap-schedule)
    overlap_schedule: bool | None = None
    # EPD: registered memory for image embeddings (MiB): an encoder's held ones, a prefill's incoming ones
    embed_buffer_mb: int | None = Field(None, ge=1)
    # what the keeper does when a replica exits: docs/topology.md, `keeper`
    restart: RestartPolicy = "on-failure"

    @field_validator("restart", mode="before")
    @classmethod
    def _restart_no(cls, value: object) -> object:
        return _restart_text(value)

    @model_validator(mode="after")
    def _a2a_needs_experts(self) -> Role:
        if self.moe_a2a_backend == "mooncake" and self.ep == 1:
            raise ValueError(
                "moe_a2a_backend: mooncake exchanges tokens between expert-parallel ranks; set ep > 1"
            )
        return self

    @field_validator("env", mode="before")
    @classmethod
    def _env_values_as_text(cls, env: object) -> object:
        # YAML reads `1` and `true` as numbers and booleans; an environment holds only strings
        if isinstance(env, dict):
            return {k: _env_text(v) for k, v in env.items()}
        return env

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if (
                not key
                or not (key[0].isalpha() or key[0] == "_")
                or not all(c.isalnum() or c == "_" for c in key)
            ):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return env


def _env_text(value: object) -> object:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return str(value)
    return value


class Proxy(Strict):
    host: str | None = None  # default: the first host
    port: int = Field(8000, ge=1, le=65535)
    bind: str | None = None
    policy: Literal["round_robin", "random", "least_load", "power_of_two"] = "round_robin"
    # auto: sglang_router for engine sglang (SGLang's mini_lb when sglang.version predates the router's
    # takeover), the builtin proxy otherwise; router and mini_lb need engine sglang (docs/sglang.md)
    use: Literal["auto", "builtin", "router", "mini_lb"] = "auto"
    # builtin proxy: the longest silence between two bytes of a worker's (streamed) answer, so a frozen
    # worker is noticed long before the whole request's budget is spent
    read_timeout_s: float = Field(60.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)  # builtin proxy: one request, end to end
    # builtin proxy: a request whose prefill failed before the client got a byte is sent again, to
    # another prefill, at most this many times
    retries: int = Field(2, ge=0, le=10)
    # builtin proxy: a worker that leaves this many requests in a row unanswered is out of rotation for
    # breaker_cooldown_s, then gets one trial request
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(10.0, gt=0)
    restart: RestartPolicy = "on-failure"

    @field_validator("restart", mode="before")
    @classmethod
    def _restart_no(cls, value: object) -> object:
        return _restart_text(value)


class Keeper(Strict):
    """How the keeper paces restarts: the n-th restart of a process within `window_s` waits
    `backoff_s * 2**(n-1)` (at most `backoff_max_s`); past `max_restarts` in the window it gives up."""

    backoff_s: float = Field(5.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    max_restarts: int = Field(5, ge=1)
    window_s: float = Field(300.0, gt=0)
    # a restarted process must be healthy within this, or it counts as another failure
    health_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _cap_above_base(self) -> Keeper:
        if self.backoff_max_s < self.backoff_s:
            raise ValueError("backoff_max_s must be at least backoff_s")
        return self


class Sglang(Strict):
    # the SGLang release the commands are rendered for; unset: the one disaggctl pins (docs/sglang.md)
    version: str | None = Field(None, pattern=r"^\d+\.\d+\.\d+(\.post\d+)?$")


class Topology(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    engine: Literal["embedded", "sglang"] = "embedded"
    model: Model
    hosts: list[Host] = Field(default_factory=lambda: [Host(name="local", address="127.0.0.1")])
    transfer: Transfer = Transfer()
    encoder: Role | None = None
    prefill: Role | None = None
    decode: Role | None = None
    colocated: Role | None = None
    proxy: Proxy = Proxy()
    keeper: Keeper = Keeper()
    sglang: Sglang = Sglang()

    # where each field came from in the YAML file: path tuple -> line (filled by load.py)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)

    @field_validator("hosts")
    @classmethod
    def _some_hosts(cls, hosts: list[Host]) -> list[Host]:
        if not hosts:
            raise ValueError("at least one host is needed")
        return hosts

    @model_validator(mode="after")
    def _some_role(self) -> Topology:
        if not any(getattr(self, r) for r in ROLES):
            raise ValueError("no role: add prefill + decode, or colocated")
        return self

    def roles(self) -> list[tuple[str, Role]]:
        """The roles present, in start order."""
        return [(r, getattr(self, r)) for r in ROLES if getattr(self, r) is not None]
