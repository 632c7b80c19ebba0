"""What ships: the sdist and the wheel built from it, as ``pip install`` from PyPI would get them.

The package is pure Python, so the wheel is universal (``py3-none-any``): it installs
without a compiler, on musl, Windows and ARM alike. The build runs with no compiler on
``PATH`` to hold that. The wheel is installed into a new virtualenv, never next to the
checkout: the package must import from site-packages, carry its Lua scripts and
``py.typed``, and serve the example app (five 202s, then a 429). The dependencies are held
to ``uv.lock``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import uv

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
UV = uv.find_uv_bin()
LUA = sorted(p.name for p in (ROOT / "fastapi_ratelimit" / "backends" / "lua").glob("*.lua"))
SHIPPED = (
    "fastapi_ratelimit/py.typed",
    *(f"fastapi_ratelimit/backends/lua/{name}" for name in LUA),
    # The live dashboard's page, script and styles: it must work offline.
    *(f"fastapi_ratelimit/dashboard/{name}" for name in ("index.html", "app.js", "style.css")),
)


def run(argv: list[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, failing the test with its output when it fails."""
    done = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, check=False, cwd=cwd, env=env
    )
    output: str = done.stdout + done.stderr
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{output[-6000:]}"
    return output


def build(out: Path) -> list[Path]:
    """``python -m build``: the sdist from the checkout, then the wheel from the sdist, with
    no compiler to be found (a PATH holding only this interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "LDSHARED")}
    bin_dir = out / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    env["PATH"] = str(bin_dir)
    assert shutil.which("gcc", path=env["PATH"]) is None
    run(
        [sys.executable, "-m", "build", "--installer", "uv", "--outdir", out / "dist", ROOT],
        env={**env, "UV": UV},
        cwd=out,
    )
    built = sorted((out / "dist").iterdir(), key=lambda p: p.suffix)
    assert [p.suffix for p in built] == [".gz", ".whl"], built
    return built


def install(wheel: Path, venv: Path, constraints: Path) -> Path:
    run([UV, "venv", "-q", "--python", sys.executable, venv])
    python = venv / "bin" / "python"
    spec = f"fastapi_ratelimit[example] @ {wheel.as_uri()}"
    run([UV, "pip", "install", "-q", "--python", python, "--constraint", constraints, spec])
    return python


@pytest.fixture(scope="module")
def constraints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lock") / "constraints.txt"
    run(
        [
            UV,
            "export",
            "-q",
            "--frozen",
            "--no-hashes",
            "--extra",
            "example",
            "--no-emit-project",
            "--output-file",
            str(path),
        ],
        cwd=ROOT,
    )
    return path


PROBE = """
import importlib.resources, json, fastapi_ratelimit
files = importlib.resources.files("fastapi_ratelimit")
print(json.dumps({
    "file": fastapi_ratelimit.__file__,
    "lua": sorted(p.name for p in (files / "backends" / "lua").iterdir()),
    "typed": (files / "py.typed").is_file(),
}))
"""


def test_built_wheel_installs_and_serves_the_example(tmp_path: Path, constraints: Path) -> None:
    sdist, wheel = build(tmp_path)
    assert wheel.name == "fastapi_ratelimit-0.1.0-py3-none-any.whl"
    run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel])

    names = zipfile.ZipFile(wheel).namelist()
    for shipped in SHIPPED:
        assert shipped in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))], names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))]

    python = install(wheel, tmp_path / "venv", constraints)
    # From a folder outside the checkout, so that only the installed wheel can be imported.
    probe = json.loads(run([python, "-c", PROBE], cwd=tmp_path))
    assert Path(probe["file"]).is_relative_to(tmp_path / "venv"), probe["file"]
    assert probe["typed"] is True
    assert probe["lua"] == LUA

    # examples/app.py run by path: its folder goes first on sys.path, never the checkout root.
    run(
        [
            sys.executable,
            ROOT / "scripts" / "smoke_example.py",
            "--timeout",
            "60",
            "--",
            python,
            str(ROOT / "examples" / "app.py"),
        ],
        cwd=tmp_path,
    )


def test_uv_pinned_by_the_test_script_is_the_locked_one() -> None:
    """scripts/test.sh bootstraps uv before the lock can be read: the two pins must agree."""
    script = (ROOT / "scripts" / "test.sh").read_text()
    pinned = next(
        line.split("=", 1)[1] for line in script.splitlines() if line.startswith("UV_VERSION=")
    )
    lock = (ROOT / "uv.lock").read_text()
    assert f'name = "uv"\nversion = "{pinned}"\n' in lock
