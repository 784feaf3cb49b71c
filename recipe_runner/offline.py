"""Reading the Hugging Face Hub's cache at once when the Hub cannot be reached.

huggingface_hub retries a request that cannot connect, waiting longer each time (1, 2, 4, 8 s ...), for
every file it looks up. On a machine without a network and without HF_HUB_OFFLINE, `recipe plan --trace`
of a hub base waited 46 s before it fell back to the offline architecture, and loading a tiny base
already in the hub cache took 99 s instead of 5, every file waiting. Here one connection attempt decides:
if the Hub's host cannot be reached within a few seconds, this process, and the workers it starts, read
the hub cache only, as HF_HUB_OFFLINE=1 would make them.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
# Behind a proxy the Hub's host may be unreachable directly and fine through it: huggingface_hub decides.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

_unreachable: str | None = None  # the endpoint this process found unreachable, once it has looked
_looked = False


def _reachable(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:  # no DNS, refused, no route, timed out
        return False
    return True


def offline_unless_reachable() -> None:
    """Before the first hub lookup: go offline if the Hub cannot be reached. Once per process; never when
    the user set HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) either way, or a proxy."""
    global _looked, _unreachable
    if _looked:
        return
    _looked = True
    decided = any(os.environ.get(name) is not None for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if decided or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return
    from huggingface_hub import constants  # its endpoint (HF_ENDPOINT's, or the Hub's) and offline switch

    if _reachable(constants.ENDPOINT):
        return
    _unreachable = constants.ENDPOINT
    constants.HF_HUB_OFFLINE = True  # read at each lookup (is_offline_mode(), the session's offline check)
    os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes this one starts


def hub_offline() -> bool:
    """Whether this process reads the hub cache only (HF_HUB_OFFLINE, or the Hub found unreachable)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def unreachable() -> str | None:
    """The Hub endpoint this process could not reach (and so reads the cache only), or None."""
    return _unreachable


def cache_only_reason() -> str:
    """Why the hub cache alone was read, for messages about files that were not in it."""
    if _unreachable is not None:
        return f"{_unreachable} could not be reached (no network?)"
    return "HF_HUB_OFFLINE is set"
