"""Storage key layout.

``<prefix>:<scope>:<policy>:<algorithm code>:{<32 hex digits>}``

The identifier (an IP, an API key, a user id, or a tuple of them for composite scopes) is
hashed with BLAKE2b into 16 bytes, so keys have a fixed length whatever the client sends,
raw API keys never reach the store, and nobody can inject ``:``, ``*`` or a ``{...}`` hash tag.
The digest is the Redis Cluster hash tag: every policy of one identity shares a slot.
Parts of a composite identity are length-prefixed before hashing, so ``("a:b", "c")`` and
``("a", "b:c")`` cannot collide.
"""

from __future__ import annotations

import re
from hashlib import blake2b

from .errors import ConfigurationError

__all__ = ["Identity", "KeyBuilder"]

#: One identifier, or several for a composite scope such as user + endpoint.
Identity = str | tuple[str, ...]

_SAFE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,63}")
_MAX_CACHED_SCOPES = 1024
#: Recently built keys: the global and endpoint levels, and active clients, repeat a lot.
#: Only short identities are cached (a 64 KiB header must not pin 64 KiB), and the cache is
#: simply emptied when full, so a flood of distinct identities costs a rebuild, not memory.
_KEY_CACHE_SIZE = 8192
_MAX_CACHED_IDENTITY = 128


class KeyBuilder:
    """Builds storage keys. ``secret`` (optional) keys the hash, so that low-entropy
    identifiers such as IP addresses cannot be recovered from the store by brute force."""

    __slots__ = ("_prefix", "_scopes", "_secret", "cached")

    def __init__(self, prefix: str = "rl", *, secret: bytes | None = None) -> None:
        if not isinstance(prefix, str) or not _SAFE_RE.fullmatch(prefix):
            raise ConfigurationError(
                "prefix", prefix, "must be 1-64 characters of letters, digits, '_', '.', '+', '-'"
            )
        if secret is not None and (not isinstance(secret, bytes) or len(secret) > 64):
            raise ConfigurationError("key_secret", "<hidden>", "must be bytes, at most 64 long")
        self._prefix = prefix
        self._secret = secret or b""
        self._scopes: set[str] = set()
        #: ``(scope, policy, algorithm code, identity) -> key`` for keys built lately: hot
        #: paths look here first and call :meth:`key` only on a miss. Read-only for them.
        self.cached: dict[tuple[str, str, str, Identity], str] = {}

    @property
    def prefix(self) -> str:
        return self._prefix

    def digest(self, identity: Identity) -> str:
        """The fixed-length hex digest of an identity."""
        h = blake2b(digest_size=16, key=self._secret)
        if isinstance(identity, str):
            identity = (identity,)
        for part in identity:
            # surrogatepass: a lone surrogate from a hostile header must hash, not raise.
            raw = part.encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "big"))
            h.update(raw)
        return h.hexdigest()

    def key(self, scope: str, policy: str, algorithm_code: str, identity: Identity) -> str:
        cache_key = (scope, policy, algorithm_code, identity)
        key = self.cached.get(cache_key)
        if key is not None:
            return key
        if scope not in self._scopes:
            self._check_scope(scope)
        key = f"{self._prefix}:{scope}:{policy}:{algorithm_code}:{{{self.digest(identity)}}}"
        size = len(identity) if isinstance(identity, str) else sum(map(len, identity))
        if size <= _MAX_CACHED_IDENTITY:
            if len(self.cached) >= _KEY_CACHE_SIZE:
                self.cached.clear()
            self.cached[cache_key] = key
        return key

    def pattern(self) -> str:
        """A SCAN pattern matching every key this builder makes."""
        return f"{self._prefix}:*"

    def _check_scope(self, scope: str) -> None:
        # Scopes come from configuration, so this runs once per scope name; the cache is
        # bounded in case a caller builds scope names from request data.
        if not isinstance(scope, str) or not _SAFE_RE.fullmatch(scope):
            raise ConfigurationError(
                "scope", scope, "must be 1-64 characters of letters, digits, '_', '.', '+', '-'"
            )
        if len(self._scopes) < _MAX_CACHED_SCOPES:
            self._scopes.add(scope)
