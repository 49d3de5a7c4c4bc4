"""apdispatch: an access-point dispatcher for DNN inference at the network edge.

``from apdispatch import Client, AsyncClient`` is the client SDK; the rest is
imported lazily so that light roles (an edge worker) pull in nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apdispatch.common import __version__

_LAZY = {
    "Client": "apdispatch.client",
    "AsyncClient": "apdispatch.client",
    "Result": "apdispatch.client",
    "Target": "apdispatch.client",
    "Timings": "apdispatch.client",
    "ApdispatchError": "apdispatch.common.errors",
    "RejectedError": "apdispatch.common.errors",
    "InvalidRequestError": "apdispatch.common.errors",
    "NotFoundError": "apdispatch.common.errors",
    "UnavailableError": "apdispatch.common.errors",
}

__all__ = [
    "ApdispatchError",
    "AsyncClient",
    "Client",
    "InvalidRequestError",
    "NotFoundError",
    "RejectedError",
    "Result",
    "Target",
    "Timings",
    "UnavailableError",
    "__version__",
]

if TYPE_CHECKING:
    from apdispatch.client import AsyncClient, Client, Result, Target, Timings
    from apdispatch.common.errors import (
        ApdispatchError,
        InvalidRequestError,
        NotFoundError,
        RejectedError,
        UnavailableError,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'apdispatch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
