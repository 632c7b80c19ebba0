"""Pure reference implementations of the five algorithms: maths only, no I/O.

Each module has a Lua twin of the same stem in ``fastapi_ratelimit/backends/lua/``.
"""
