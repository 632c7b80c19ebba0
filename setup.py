"""The optional C speedups (``fastapi_ratelimit/_speedups.c``); everything else is in
pyproject.toml. ``optional=True``: without a compiler the install still succeeds and the
pure-Python twins run (``fastapi_ratelimit._accel.ACCELERATED`` says which)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastapi_ratelimit._speedups",
            ["fastapi_ratelimit/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
