"""``slowapi-redis-5``: five stacked ``@limiter.limit`` decorators, Redis storage.

slowapi appends every decorator's limits to the route's list and ``hit``s each one in turn
(``Limiter.__evaluate_limits``): five limits are five separate storage calls. The five rates
differ (1000000000..1000000004/minute) because ``limits`` keys a counter on the rate as well
as the identity: five identical rates would all count into one key. (``default_limits`` would
not do either: slowapi deduplicates it with ``set()``.)
"""

import os

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, storage_uri=os.environ["BENCH_REDIS_URL"])

app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/hello")
@limiter.limit("1000000000/minute")
@limiter.limit("1000000001/minute")
@limiter.limit("1000000002/minute")
@limiter.limit("1000000003/minute")
@limiter.limit("1000000004/minute")
async def hello(request: Request) -> dict[str, str]:
    return {"hello": "world"}
