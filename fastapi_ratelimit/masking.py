"""How a client is shown outside the process (dashboard, logs): never the raw API key, never
the full address."""

from __future__ import annotations

import hashlib
import ipaddress

__all__ = ["mask_identity"]


def mask_identity(kind: str, identity: str) -> str:
    """An IP as its network (``203.0.113.0/24``, IPv6 ``/48``), an API key as ``key#`` and 4
    hex digits of its SHA-256, anything else (a user) as its kind and first 4 characters."""
    if kind == "ip":
        try:
            address = ipaddress.ip_network(identity, strict=False)
            prefix = 24 if address.version == 4 else 48
            return str(address.supernet(new_prefix=min(prefix, address.prefixlen)))
        except ValueError:
            return "ip#" + _digest(identity)
    if kind == "api_key":
        return "key#" + _digest(identity)
    return f"{kind}:{identity[:4]}…"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:4]
