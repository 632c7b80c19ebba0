"""The deployment files: alert rules (promtool), the Grafana dashboard, docker-compose.yml.

promtool (Debian package ``prometheus``) and docker-compose (package ``docker-compose``) are
installed by ``.ci/run``; under CI=true a missing tool fails these tests instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastapi_ratelimit.metrics import METRICS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "ratelimit-dashboard.json"
METRIC_NAME = re.compile(r"\brate_limit_[a-z_]+")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus docker-compose)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def exported(expression: str) -> set[str]:
    """The metric names an expression uses, as the families we export."""
    names = set()
    for name in METRIC_NAME.findall(expression):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in METRICS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    assert "SUCCESS: 6 rules found" in run(promtool, "check", "rules", str(ALERTS)).stdout
    run(promtool, "test", "rules", str(ALERTS.with_name("alerts_test.yml")))
    run(promtool, "check", "config", str(ALERTS.with_name("prometheus.yml")))


def test_alerts_and_dashboard_use_only_metrics_that_exist() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "HighRateLimitBlockRate",
        "ElevatedRateLimitBlockRate",
        "HighRequestVolume",
        "SlowRateLimitChecks",
        "RateLimitBackendDown",
        "RateLimitBreakerOpen",
    }
    used = set().union(*(exported(rule["expr"]) for rule in rules))
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for expected in ("Request rate", "Block rate", "Requests by tier", "Backend errors"):
        assert expected in titles
    assert any(title.startswith("Breaker state") for title in titles)
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("histogram_quantile(0.95" in e for e in expressions)
    used |= set().union(*(exported(e) for e in expressions))
    assert used <= set(METRICS), used - set(METRICS)


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for field in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert field in dashboard
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["targets"]
        assert all(target["refId"] for target in panel["targets"])


def test_compose_file_is_valid_and_mounts_only_files_that_exist() -> None:
    compose = tool("docker-compose")
    result = run(
        compose, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"), "config"
    )
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"app", "redis", "prometheus", "grafana"} <= set(services)
    mounts = 0
    for service in services.values():
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert Path(source).exists(), f"mounted but missing: {source}"
            mounts += 1
    assert mounts >= 4
    # The app is built from the Dockerfile, installed at build time: no bind-mounted checkout.
    app = services["app"]
    assert Path(app["build"]["context"]).resolve() == ROOT
    assert "volumes" not in app
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, flags=re.M)) == 2
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.M)
    assert "--workers" in dockerfile
