"""Which hosts reach only this machine: one rule for `serve`, `listen` and the Ray engine."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`, not a URL) only accepts connections from this machine."""
    host = host.strip()
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
