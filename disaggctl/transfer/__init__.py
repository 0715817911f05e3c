"""KV transfer between prefill and decode: Mooncake writes (`mooncake`), pool addressing (`kv_layout`)
and the room rendezvous (`bootstrap`).

Names are re-exported lazily so that importing the package pulls in neither Mooncake nor aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MooncakeAgent": "mooncake",
    "MooncakeUnavailableError": "mooncake",
    "TransferError": "mooncake",
    "KvLayout": "kv_layout",
    "kv_write_batches": "kv_layout",
    "merge_runs": "kv_layout",
    "PrefillBootstrap": "bootstrap",
    "DecodeBootstrapClient": "bootstrap",
    "DecodeRegistration": "bootstrap",
    "KvResult": "bootstrap",
    "KvTransferError": "bootstrap",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
