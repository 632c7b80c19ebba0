# The example app (examples/app.py) on uvicorn with several workers.
#   docker build -t fastapi-ratelimit-example .    (docker-compose.yml builds it for you)
# Stage 1 builds wheels for the package and its extras; stage 2 installs them once, at build
# time, as root, then runs as an unprivileged user with nothing but the wheels' contents.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fastapi_ratelimit ./fastapi_ratelimit
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[example,prometheus]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus \
    WORKERS=4
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 app
WORKDIR /app
COPY examples/__init__.py examples/app.py ./examples/
USER app
EXPOSE 8000
# The metrics directory is emptied at every start: counts of workers from a previous run
# must not be added to this one's.
CMD ["sh", "-c", "rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec uvicorn examples.app:app --host 0.0.0.0 --port 8000 --workers \"$WORKERS\" --proxy-headers"]
