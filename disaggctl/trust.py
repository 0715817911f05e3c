"""The deployment secret and the proof every internal call carries (docs/security.md).

`disaggctl up` makes one random secret per deployment and hands it to its processes as a 0600 file named
by `DISAGGCTL_SECRET_FILE` (never on a command line). Internal calls — proxy -> worker with bootstrap
fields, decode -> prefill bootstrap, prefill -> decode layout fetch — carry an HMAC of the request
(method, path, time, body) in one header; answers that a caller acts on (the bootstrap's "KV written",
the decode's layout) carry an HMAC bound to the request's path. A caller without the secret can neither
make a call count nor forge an answer, and a captured proof is useless for any other path or body.

Standard library only: the control plane (proxy, launcher) and the data plane (runtime) both use it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

HEADER = "X-Disaggctl-Auth"
ENV_FILE = "DISAGGCTL_SECRET_FILE"
ENV_HEX = "DISAGGCTL_SECRET"  # the secret itself, hex: for processes started by hand or by tests
SECRET_BYTES = 32
# Proofs older or newer than this are refused: bounds the replay window and tolerates clock skew
# between hosts. Replaying a proof inside the window repeats a call exactly; every call it can repeat is
# single-use by room (docs/security.md).
MAX_SKEW_S = 300.0
_VERSION = "v1"


class AuthError(Exception):
    """A call or an answer that does not prove it belongs to the deployment; the message says why."""


class DeploymentKey:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("a deployment secret has at least 16 bytes")
        self._secret = secret

    def __repr__(self) -> str:  # never the secret itself, not even in a traceback
        return f"DeploymentKey(id={self.key_id})"

    @property
    def key_id(self) -> str:
        """A short public name of the key (to tell two deployments' keys apart in logs)."""
        return hashlib.sha256(b"disaggctl key id" + self._secret).hexdigest()[:8]

    # -- making, storing and finding ------------------------------------------------------------------

    @classmethod
    def generate(cls) -> DeploymentKey:
        return cls(secrets.token_bytes(SECRET_BYTES))

    def hex(self) -> str:
        return self._secret.hex()

    def write(self, path: str | Path) -> Path:
        """Store as hex in a file only the owner can read (created 0600, replaced atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (self.hex() + "\n").encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> DeploymentKey:
        path = Path(path)
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"cannot read the deployment secret {path}: {e.strerror or e}") from e
        if path.stat().st_mode & 0o077:
            raise AuthError(f"the deployment secret {path} is readable by others (chmod 600 it)")
        return cls._from_hex(text, str(path))

    @classmethod
    def _from_hex(cls, text: str, where: str) -> DeploymentKey:
        try:
            return cls(bytes.fromhex(text))
        except ValueError as e:
            raise AuthError(f"the deployment secret in {where} is not valid hex of 16+ bytes") from e

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeploymentKey | None:
        """The key this process was started with, or None when it was started without one."""
        env = os.environ if environ is None else environ
        if env.get(ENV_FILE):
            return cls.read(env[ENV_FILE])
        if env.get(ENV_HEX):
            return cls._from_hex(env[ENV_HEX], ENV_HEX)
        return None

    @classmethod
    def for_server(cls, what: str, required: bool) -> DeploymentKey | None:
        """`from_env` for a server process starting: AuthError, with what to do, when the secret is
        unreadable or, where `required` (a server with internal endpoints), missing."""
        key = cls.from_env()
        if key is None and required:
            raise AuthError(
                f"{what} needs the deployment secret: set {ENV_FILE} (a 0600 file with the hex secret) or "
                f"{ENV_HEX}; `disaggctl up` does this"
            )
        return key

    def env(self, path: str | Path | None = None) -> dict[str, str]:
        """The environment that hands this key to a child process: the file when given, else the hex."""
        return {ENV_FILE: str(path)} if path is not None else {ENV_HEX: self.hex()}

    # -- requests -------------------------------------------------------------------------------------

    def _mac(self, *parts: str | bytes) -> str:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            mac.update(len(data).to_bytes(8, "big"))  # length-prefixed: no two part lists sign alike
            mac.update(data)
        return mac.hexdigest()

    def sign(self, method: str, path: str, body: bytes = b"", now: float | None = None) -> str:
        """The header value that proves this request (method, path with query, body) comes from us."""
        ts = str(int(time.time() if now is None else now))
        digest = hashlib.sha256(body).hexdigest()
        return f"{_VERSION} t={ts} s={self._mac('request', method.upper(), path, ts, digest)}"

    def headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        return {HEADER: self.sign(method, path, body)}

    def verify(
        self, method: str, path: str, body: bytes, header: str | None, now: float | None = None
    ) -> None:
        """AuthError unless `header` is a fresh proof of exactly this request."""
        ts, mac = _parse(header)
        _check_fresh(ts, now)
        digest = hashlib.sha256(body).hexdigest()
        if not hmac.compare_digest(mac, self._mac("request", method.upper(), path, ts, digest)):
            raise AuthError("the request's proof does not match (another deployment's secret, or altered)")

    # -- answers --------------------------------------------------------------------------------------

    def sign_answer(self, path: str, status: int, body: bytes, now: float | None = None) -> str:
        """Proof of an answer to a request for `path`: it cannot be replayed for another path (room)."""
        ts = str(int(time.time() if now is None else now))
        digest = hashlib.sha256(body).hexdigest()
        return f"{_VERSION} t={ts} s={self._mac('answer', path, str(int(status)), ts, digest)}"

    def verify_answer(
        self, path: str, status: int, body: bytes, header: str | None, now: float | None = None
    ) -> None:
        ts, mac = _parse(header)
        _check_fresh(ts, now)
        digest = hashlib.sha256(body).hexdigest()
        if not hmac.compare_digest(mac, self._mac("answer", path, str(int(status)), ts, digest)):
            raise AuthError("the answer's proof does not match: it does not come from this deployment")


def _parse(header: str | None) -> tuple[str, str]:
    if not header:
        raise AuthError(f"no {HEADER} header: internal calls must prove they belong to the deployment")
    fields = header.split(" ")
    if (
        len(fields) != 3
        or fields[0] != _VERSION
        or not fields[1].startswith("t=")
        or not fields[2].startswith("s=")
    ):
        raise AuthError(f"malformed {HEADER} header")
    ts, mac = fields[1][2:], fields[2][2:]
    if not (ts.isascii() and ts.isdigit() and len(ts) <= 12 and len(mac) == 64):
        raise AuthError(f"malformed {HEADER} header")
    return ts, mac


def _check_fresh(ts: str, now: float | None) -> None:
    skew = abs((time.time() if now is None else now) - int(ts))
    if skew > MAX_SKEW_S:
        raise AuthError(
            f"the proof is {skew:.0f} s away from this host's clock (at most {MAX_SKEW_S:g} s): "
            "a replay, or clocks out of sync"
        )


SECRET_NAME_HINTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "ACCESS_KEY", "AUTH")


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name suggests its value must not be shown (plan, logs, ps)."""
    upper = name.upper()
    return any(hint in upper for hint in SECRET_NAME_HINTS) or upper.endswith("_KEY")


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: ("<redacted>" if looks_secret(k) else v) for k, v in env.items()}
