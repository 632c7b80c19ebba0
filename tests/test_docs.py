"""Every ``python`` code block in ``docs/**/*.md`` runs here, so the documentation cannot rot.

The convention (also in docs/contributing.md):

- A block fenced as ```` ```python ```` is run. Blocks in other languages (``bash``, ``nginx``,
  ``http``, ``text``) are not Python and are not run.
- The blocks of one page run in order in one namespace, as a reader would type them into
  ``python -m asyncio``: a later block may use what an earlier one defined, and top-level
  ``await`` works. Samples assert what the text claims (statuses, headers).
- Pages that name a Redis set-up get a real one from ``tests/servers/`` in its place:
  ``redis://localhost:6379/0`` (standalone), ``redis://localhost:7000`` (a Cluster node) and
  ``[("localhost", 26379)]`` (the Sentinels of ``"mymaster"``).
- ``<!-- docs-test: skip REASON -->`` on the line before a ``python`` block skips it; the
  reason is required, and this suite fails on a skip without one.
- ``<!-- docs-test: requires MODULE ... -->`` on a page (the migration guide shows code of
  other libraries) skips the page where one of those modules is not installed.
"""

from __future__ import annotations

import ast
import gc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastapi_ratelimit import Backend, RateLimiter

DOCS = Path(__file__).resolve().parent.parent / "docs"
README = DOCS.parent / "README.md"
#: Issue 18: the README stays short; everything else lives in the docs.
README_MAX_LINES = 250

STANDALONE = "redis://localhost:6379/0"
CLUSTER = "redis://localhost:7000"
SENTINELS = '[("localhost", 26379)]'

_FENCE = re.compile(r"^( *)```(\S*)\s*$")
_SKIP = re.compile(r"^ *<!-- docs-test: skip(.*?)-->\s*$")
_REQUIRES = re.compile(r"^<!-- docs-test: requires (.+?) -->\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    code: str
    skip_reason: str | None


def blocks(page: Path) -> list[Block]:
    """The fenced ``python`` blocks of a page, in order. A fence may be indented (inside a
    tab or an admonition); the block's lines lose that indentation."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        start, indent, language = i, opening.group(1), opening.group(2)
        i += 1
        while i < len(lines) and lines[i].rstrip() != indent + "```":
            i += 1
        if language == "python":
            skip = _SKIP.match(lines[start - 1]) if start > 0 else None
            reason = skip.group(1).strip() if skip else None
            code = "\n".join(line.removeprefix(indent) for line in lines[start + 1 : i])
            found.append(Block(page, start + 2, code, reason))
        i += 1
    return found


PAGES = sorted(p for p in DOCS.rglob("*.md") if blocks(p))


def _marks(page: Path) -> list[pytest.MarkDecorator]:
    text = page.read_text(encoding="utf-8")
    marks = []
    if STANDALONE in text or CLUSTER in text or SENTINELS in text:
        marks.append(pytest.mark.redis)
    if CLUSTER in text:
        marks.append(pytest.mark.cluster)
    if SENTINELS in text:
        marks.append(pytest.mark.sentinel)
    return marks


def _substitute(code: str, request: pytest.FixtureRequest) -> str:
    if STANDALONE in code:
        code = code.replace(STANDALONE, request.getfixturevalue("redis_url"))
    if CLUSTER in code:
        code = code.replace(CLUSTER, request.getfixturevalue("cluster_url"))
    if SENTINELS in code:
        setup = request.getfixturevalue("redis_sentinel")
        # Emptied like the other fixtures' servers, so counters start from nothing.
        import redis

        with redis.Redis(host=setup.master.host, port=setup.master.port) as client:
            client.flushall()
        code = code.replace(SENTINELS, repr(setup.sentinels))
    return code


def test_the_docs_have_samples() -> None:
    # Guards the collection itself: a broken fence parser would make every page vanish.
    assert len(PAGES) >= 10
    assert sum(len(blocks(p)) for p in PAGES) >= 40


def test_skips_give_a_reason() -> None:
    for page in PAGES:
        for block in blocks(page):
            assert block.skip_reason != "", f"{page}:{block.line}: a skip needs a reason"


@pytest.mark.filterwarnings(
    # Newer Starlette's TestClient (used by the WebSocket samples: httpx's ASGITransport has no
    # WebSockets) asks for the httpx2 package, which this toolchain does not install; the
    # warning is Starlette's own and says nothing about the samples.
    "ignore:Using `httpx` with `starlette.testclient` is deprecated"
)
@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=str(p.relative_to(DOCS)), marks=_marks(p)) for p in PAGES],
)
async def test_page_samples_run(page: Path, request: pytest.FixtureRequest) -> None:
    text = page.read_text(encoding="utf-8")  # noqa: ASYNC240 - a small local file
    for requirement in _REQUIRES.findall(text):
        for module in requirement.split():
            # Installed by the locked toolchain (the `bench` extra); the --latest and
            # --lowest modes install only `dev`, and skip such a page.
            pytest.importorskip(module)
    namespace: dict[str, Any] = {"__name__": "docs_sample"}
    # Earlier pages leave garbage behind; a full collection in the middle of a page's first
    # Redis connection can outlast the backend's 50 ms timeout on a busy machine, and the
    # sample then fails open (an admitted request it does not expect). Collect it up front.
    gc.collect()
    try:
        for block in blocks(page):
            if block.skip_reason is not None:
                continue
            source = _substitute(block.code, request)
            # Blank lines first, so tracebacks give the line numbers of the Markdown file.
            padded = "\n" * (block.line - 1) + source
            code = compile(
                padded,
                str(page.relative_to(DOCS.parent)),
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            )
            result = eval(code, namespace)  # a coroutine when the block awaits at top level
            if result is not None:
                await result
    finally:
        # Close what the samples opened (Redis connections, background refreshes), as the
        # app's lifespan would.
        for value in list(namespace.values()):
            if isinstance(value, (RateLimiter, Backend)) and not isinstance(value, type):
                await value.aclose()


async def test_the_plots_show_what_the_concepts_page_says() -> None:
    # docs/plots.py draws docs/img/ from the real MemoryBackend; the prose beside each image
    # describes what it shows. Hold the data behind the images to that prose.
    pytest.importorskip("matplotlib")  # the `docs` extra; not in the --latest/--lowest modes
    import importlib.util

    from fastapi_ratelimit import Algorithm

    spec = importlib.util.spec_from_file_location("docs_plots", DOCS / "plots.py")
    assert spec is not None
    assert spec.loader is not None
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    arrivals = plots.traffic()
    passed = {a: await plots.admitted(a, arrivals) for a in Algorithm}

    def between(algorithm: Algorithm, start: float, end: float) -> int:
        return sum(start <= t < end for t in passed[algorithm])

    # Fixed window: 10 at the end of one window and 10 at the start of the next.
    assert between(Algorithm.FIXED_WINDOW, 9, 11) == 20
    # Sliding log: never more than 10 in any 10 seconds.
    for t in passed[Algorithm.SLIDING_WINDOW_LOG]:
        assert between(Algorithm.SLIDING_WINDOW_LOG, t, t + 10) <= 10
    # Sliding counter: the burst after the boundary is refused.
    assert between(Algorithm.SLIDING_WINDOW_COUNTER, 10, 11) == 0
    # Buckets: a burst of 10, then about one a second while the trickle lasts.
    for bucket in (Algorithm.TOKEN_BUCKET, Algorithm.GCRA):
        assert between(bucket, 9, 10) == 10
        assert 14 <= between(bucket, 16, 30) <= 15
    for algorithm in Algorithm:
        assert (DOCS / "img" / f"{algorithm.value}.png").is_file()


def test_the_api_reference_covers_every_public_name() -> None:
    import fastapi_ratelimit

    documented = set(re.findall(r"^::: fastapi_ratelimit\.(?:\w+\.)*(\w+)$", _reference(), re.M))
    missing = set(fastapi_ratelimit.__all__) - documented - {"__version__"}
    assert not missing, f"add to docs/reference.md: {sorted(missing)}"


def test_the_readme_stays_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move some to docs/"


def test_the_readme_links_only_to_pages_that_exist() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]*)(?:#[^)]*)?\)", text)
    assert len(links) >= 15  # the link table itself: a broken pattern must not pass vacuously
    missing = sorted({link for link in links if not (DOCS.parent / link).is_file()})
    assert not missing, f"README.md links to missing pages: {missing}"
    # Only Markdown pages: a link to a built page (.html) would 404 on GitHub.
    assert all(link.endswith(".md") for link in links)


async def test_the_readme_example_runs() -> None:
    import httpx

    [block] = blocks(README)
    namespace: dict[str, Any] = {"__name__": "readme_sample"}
    exec(compile(block.code, "README.md", "exec"), namespace)
    app = namespace["app"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        responses = [await c.post("/reports") for _ in range(6)]
    assert [r.status_code for r in responses] == [200] * 5 + [429]
    assert responses[-1].headers["content-type"] == "application/problem+json"
    assert int(responses[-1].headers["retry-after"]) >= 1
    assert "ratelimit-policy" in responses[0].headers
    assert "ratelimit" in responses[0].headers


def _reference() -> str:
    return (DOCS / "reference.md").read_text(encoding="utf-8")
