"""How tests that install from the package index tell "no index here" from a real failure."""

from __future__ import annotations

# What pip prints when the index cannot be reached at all (no route, no DNS, proxy down). Any
# other failure, a resolution conflict above all, fails the test that asked.
NO_INDEX = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
)


def index_unreachable(pip_output: str) -> bool:
    return any(marker in pip_output for marker in NO_INDEX)
