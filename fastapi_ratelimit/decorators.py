"""``@rate_limit(...)``: a route decorator that needs no ``request`` parameter.

It works on async and sync endpoints, with ``from __future__ import annotations`` and
``Annotated`` dependencies, on FastAPI and on plain Starlette routes. The wrapper exposes the
endpoint's signature (annotations resolved) plus hidden ``Request``/``Response`` parameters,
so FastAPI injects them and its OpenAPI output is unchanged. An endpoint that takes a
``Request`` or ``Response`` of its own (plain or ``Annotated``) gets no hidden twin: FastAPI
injects one ``Response`` per request, so a second parameter of that type would go unfilled.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from .context import SCOPE_KEY, RequestContext
from .guards import add_headers, after_endpoint, enforce
from .policy import Algorithm, Policy
from .rate import Rate
from .route_limits import KeyFunc, RouteLimit, mark

if TYPE_CHECKING:
    from .limiter import RateLimiter

__all__ = ["rate_limit"]

F = TypeVar("F", bound=Callable[..., Any])
_CONNECTION = "fastapi_ratelimit_connection"
_RESPONSE = "fastapi_ratelimit_response"


def rate_limit(
    rate: str | Rate | Policy,
    *,
    scope: str = "ip",
    cost: int | None = None,
    key: KeyFunc | None = None,
    name: str | None = None,
    algorithm: Algorithm | str | None = None,
    limiter: RateLimiter | None = None,
    refund_when: Callable[[int], bool] | None = None,
) -> Callable[[F], F]:
    """Limit one route. Arguments as for :class:`~fastapi_ratelimit.dependencies.RateLimit`.

    Put it *below* ``@app.get(...)`` so FastAPI registers the wrapped endpoint.
    """

    def decorator(func: F) -> F:
        limit = RouteLimit.build(
            rate,
            scope=scope,
            cost=cost,
            key=key,
            name=name,
            algorithm=algorithm,
            limiter=limiter,
            refund_when=refund_when,
            where=f"@rate_limit on {getattr(func, '__qualname__', func)!r}",
        )
        signature = inspect.signature(func)
        hints = _resolved_hints(func)
        parameters = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
        ]
        own = _parameter_of(parameters, HTTPConnection)
        own_response = _parameter_of(parameters, Response)
        extra: list[inspect.Parameter] = []
        if own is None:
            extra.append(
                inspect.Parameter(_CONNECTION, inspect.Parameter.KEYWORD_ONLY, annotation=Request)
            )
        if own_response is None:
            extra.append(
                inspect.Parameter(_RESPONSE, inspect.Parameter.KEYWORD_ONLY, annotation=Response)
            )
        # Keyword-only parameters must follow any **kwargs-free positional ones.
        if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
            parameters = parameters[:-1] + extra + parameters[-1:]
        else:
            parameters += extra
        is_async = inspect.iscoroutinefunction(func)

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            # Ours are taken out; the endpoint's own (or, under a second @rate_limit, the
            # inner wrapper's hidden ones) are read and passed on.
            connection = kwargs.pop(_CONNECTION, None) if own is None else kwargs.get(own)
            response = (
                kwargs.pop(_RESPONSE, None) if own_response is None else kwargs.get(own_response)
            )
            if connection is None:
                # A plain Starlette endpoint: called with the request as its only argument.
                connection = next((a for a in args if isinstance(a, HTTPConnection)), None)
            if connection is None:
                raise RuntimeError(f"@rate_limit: no request reached {func.__qualname__}")
            charged = await enforce(limit, connection, response=response)
            try:
                if is_async:
                    result = await func(*args, **kwargs)
                else:
                    result = await run_in_threadpool(func, *args, **kwargs)
            except Exception as exc:
                await after_endpoint(limit, connection, charged, error=exc)
                raise
            context = connection.scope.get(SCOPE_KEY)
            if isinstance(context, RequestContext) and not context.middleware:
                if isinstance(result, Response) and result is not response:
                    # FastAPI sends a returned response as it is (and a plain Starlette
                    # route has no other): the headers go on it.
                    add_headers(result, limit.limiter or context.limiter, context)
                # A returned response's status, or the one the endpoint set on FastAPI's.
                status = result.status_code if isinstance(result, Response) else None
                if status is None and response is not None:
                    status = response.status_code
                await after_endpoint(limit, connection, charged, status=status)
            return result

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters,
            return_annotation=hints.get("return", signature.return_annotation),
        )
        mark(wrapper, limit)
        return typing.cast(F, wrapper)

    return decorator


def _parameter_of(parameters: list[inspect.Parameter], kind: type) -> str | None:
    """The name of the first parameter annotated with ``kind`` (or a subclass), plain or in
    ``Annotated[...]``."""
    for parameter in parameters:
        annotation = parameter.annotation
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        if inspect.isclass(annotation) and issubclass(annotation, kind):
            return parameter.name
    return None


def _resolved_hints(func: Callable[..., Any]) -> dict[str, Any]:
    # With `from __future__ import annotations` every annotation is a string, which FastAPI
    # would evaluate in *our* module's globals: resolve them against the endpoint's instead.
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception:
        hints: dict[str, Any] = {}
        namespace = getattr(func, "__globals__", {})
        for name, annotation in getattr(func, "__annotations__", {}).items():
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, namespace)
                except Exception:
                    continue
            hints[name] = annotation
        return hints
