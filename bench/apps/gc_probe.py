"""Not a variant: wraps the app of ``bench/apps/$GC_PROBE_APP.py`` and counts the garbage
collector's runs in the served process, for ``bench/gc_collections.py``.

``GET /__gc__`` answers the counts since the last ``GET /__gc__?reset=1``: runs per generation,
the longest pause and the total, in milliseconds.
"""

import gc
import importlib
import json
import os
import time
from typing import Any

app_under_test = importlib.import_module(os.environ["GC_PROBE_APP"]).app

runs = [0, 0, 0]
longest = [0.0, 0.0, 0.0]
total = [0.0]
_started = [0.0]


def _watch(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    pause = time.perf_counter() - _started[0]
    generation = info["generation"]
    runs[generation] += 1
    longest[generation] = max(longest[generation], pause)
    total[0] += pause


gc.callbacks.append(_watch)


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == "/__gc__":
        body = json.dumps(
            {
                "runs": runs,
                "longest_ms": [round(p * 1000, 2) for p in longest],
                "total_ms": round(total[0] * 1000, 2),
            }
        ).encode()
        if scope["query_string"] == b"reset=1":
            runs[:] = [0, 0, 0]
            longest[:] = [0.0, 0.0, 0.0]
            total[0] = 0.0
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await app_under_test(scope, receive, send)
