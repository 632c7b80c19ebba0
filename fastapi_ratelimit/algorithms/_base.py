"""What every algorithm reference returns.

Units: time in integer microseconds, counts in request units. Each Python reference and its
Lua twin in ``backends/lua/`` perform the same floating-point operations in the same order,
so the two backends give bit-identical decisions (the parity tests check this). In products
that may pass 2**53 the Python side starts from a float, as Lua's doubles do.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple


class Evaluation(NamedTuple):
    """One level's tentative answer, before the all-or-nothing commit."""

    #: Whether this level admits a request of this cost.
    allowed: bool
    #: Units available before this request (may be fractional for the estimating algorithms).
    available: float
    #: Microseconds until a request of this cost would pass; 0 when allowed, else >= 1.
    retry_us: int
    #: Microseconds until the quota is full again if this request is consumed.
    reset_commit_us: int
    #: Microseconds until the quota is full again if nothing is consumed.
    reset_keep_us: int
    #: The state to store if the request is consumed.
    new_state: Any
    #: How long that state can still matter, in microseconds (the key's TTL before the margin).
    ttl_us: int


#: ``new_evaluation((allowed, available, ...))``: an :class:`Evaluation` built by
#: ``tuple.__new__`` directly. NamedTuple's own ``__new__`` is a Python function, a frame per
#: level per request on the hot path; this is one C call.
new_evaluation = partial(tuple.__new__, Evaluation)
