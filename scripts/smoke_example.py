#!/usr/bin/env python3
"""Run a command that serves the example app, and check it as the README promises.

    python scripts/smoke_example.py -- bash -c \
        "pip install -e '.[example]' && python examples/app.py"

The command gets ``HOST=127.0.0.1`` and a free ``PORT`` in its environment. Once the app answers,
six ``POST /ocr/batch`` calls must give five 202s and then a 429 carrying ``Retry-After``
(the route's ``@rate_limit("5/minute", scope="user")``). The command is then stopped by its pid
(its whole process group). Exits 0 when all of that held, 1 otherwise, with the command's output.

Standard library only: it runs with any Python, outside the virtualenv it checks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def post_batch(port: int) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        f"http://{HOST}:{port}/ocr/batch",
        data=json.dumps({"documents": ["a"]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def wait_until_up(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the command exited with {process.returncode} before answering")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the app did not answer in time")


def check(port: int) -> list[str]:
    statuses: list[int] = []
    last: dict[str, str] = {}
    for _ in range(6):
        status, last = post_batch(port)
        statuses.append(status)
    problems = []
    if statuses != [202] * 5 + [429]:
        problems.append(f"six POST /ocr/batch answered {statuses}, expected five 202s then a 429")
    retry_after = {k.lower(): v for k, v in last.items()}.get("retry-after", "")
    if not retry_after.isdigit() or int(retry_after) < 1:
        problems.append(f"the 429 has Retry-After {retry_after!r}, expected a positive integer")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the app")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    port = free_port()
    env = {**os.environ, "HOST": HOST, "PORT": str(port)}
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_until_up(port, process, time.monotonic() + args.timeout)
            problems = check(port)
        except RuntimeError as error:
            problems = [str(error)]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        if problems:
            output.seek(0)
            sys.stderr.write(output.read().decode(errors="replace")[-4000:])
            for problem in problems:
                print(f"example app: {problem}", file=sys.stderr)
            return 1
    print(f"example app: five 202s then a 429 with Retry-After on port {port}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
