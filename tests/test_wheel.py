"""What ships: the sdist and the wheel built from it, as ``pip install`` from PyPI would get them.

Each wheel is installed into a new virtualenv, never next to the checkout: the package must
import from site-packages, carry its Lua scripts, ``py.typed`` and the stub, and serve the
example app (five 202s, then a 429). Built twice: once with no compiler on ``PATH`` (the
optional C extension is skipped and the pure-Python code runs) and once with one (the
extension must be built). The dependencies are held to ``uv.lock``.
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
    "fastapi_ratelimit/_speedups.pyi",
    *(f"fastapi_ratelimit/backends/lua/{name}" for name in LUA),
)


def run(argv: list[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, failing the test with its output when it fails."""
    done = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, check=False, cwd=cwd, env=env
    )
    output: str = done.stdout + done.stderr
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{output[-6000:]}"
    return output


def build(out: Path, *, compiler: bool) -> list[Path]:
    """``python -m build``: the sdist from the checkout, then the wheel from the sdist."""
    env = {k: v for k, v in env_without_pure().items() if k not in ("CC", "CXX", "LDSHARED")}
    if not compiler:
        # A PATH holding only this interpreter's bin folder: no gcc, cc or clang to be found.
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


def env_without_pure() -> dict[str, str]:
    """This process's environment, without the switch that turns the C speedups off."""
    return {k: v for k, v in os.environ.items() if k != "FASTAPI_RATELIMIT_PURE"}


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
import importlib.resources, json, fastapi_ratelimit, fastapi_ratelimit._accel as accel
files = importlib.resources.files("fastapi_ratelimit")
print(json.dumps({
    "file": fastapi_ratelimit.__file__,
    "accelerated": accel.ACCELERATED,
    "lua": sorted(p.name for p in (files / "backends" / "lua").iterdir()),
    "typed": (files / "py.typed").is_file(),
}))
"""


@pytest.mark.parametrize("compiler", [False, True], ids=["no-compiler", "compiler"])
def test_built_wheel_installs_and_serves_the_example(
    tmp_path: Path, constraints: Path, compiler: bool
) -> None:
    sdist, wheel = build(tmp_path, compiler=compiler)
    run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel])

    names = zipfile.ZipFile(wheel).namelist()
    for shipped in SHIPPED:
        assert shipped in names
    extensions = [n for n in names if n.startswith("fastapi_ratelimit/_speedups.") and ".so" in n]
    assert bool(extensions) is compiler, names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))]

    python = install(wheel, tmp_path / "venv", constraints)
    # From a folder outside the checkout, so that only the installed wheel can be imported.
    probe = json.loads(run([python, "-c", PROBE], cwd=tmp_path, env=env_without_pure()))
    assert Path(probe["file"]).is_relative_to(tmp_path / "venv"), probe["file"]
    assert probe["accelerated"] is compiler
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
        env=env_without_pure(),
    )


def test_uv_pinned_by_the_test_script_is_the_locked_one() -> None:
    """scripts/test.sh bootstraps uv before the lock can be read: the two pins must agree."""
    script = (ROOT / "scripts" / "test.sh").read_text()
    pinned = next(
        line.split("=", 1)[1] for line in script.splitlines() if line.startswith("UV_VERSION=")
    )
    lock = (ROOT / "uv.lock").read_text()
    assert f'name = "uv"\nversion = "{pinned}"\n' in lock
