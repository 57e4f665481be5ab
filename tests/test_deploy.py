"""deploy/ checked without Docker or a cluster: hadolint on the Dockerfiles, the compose files
against the Compose Specification's schema, the Kubernetes manifests against Kubernetes' schemas
(kubernetes-validate ships them), promtool on the Prometheus files, and the dashboard, rules,
manifests and exported metrics agreeing with each other. The live check is test_production_e2e.py."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from promstack import (DASHBOARD, DEPLOY, PROMETHEUS_CONFIG, RULES, comparison_sides, dashboard_queries,
                       require_prometheus, rules)
from serve_process import REPO
from server.metrics import ServerMetrics

DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.cpu.yaml", DEPLOY / "monitoring.yaml"]
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
BIN = Path(sys.executable).parent  # hadolint and check-jsonschema come with the test extra


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (pip install -e '.[test]')"
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


# ---- Dockerfiles --------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    done = run(tool("hadolint"), str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    done = run(tool("hadolint"), str(bad))
    assert done.returncode != 0 and "DL3007" in done.stdout  # latest tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_dspark_serve_as_non_root_with_health_check_and_model_volume(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert 'VOLUME ["/models"]' in text
    assert re.search(r'^ENTRYPOINT \["dspark", "serve", "--host", "0.0.0.0", "--port", "8000"', text, re.M)
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for folder in (p.rstrip("*") for p in packages["include"]):
        assert f"COPY {folder} ./{folder}" in text, f"{dockerfile.name} leaves out the {folder} package"
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        assert all((REPO / s).exists() for s in source.split()), source


def test_gpu_image_is_cuda_and_cpu_image_is_not():
    gpu, cpu = (p.read_text() for p in DOCKERFILES)
    assert "nvidia/cuda:" in gpu and "-runtime-" in gpu and "/whl/cu" in gpu and "gcc" in gpu
    assert "nvidia" not in cpu and "/whl/cpu" in cpu


def test_dockerignore_keeps_the_venv_out_of_the_build_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ---- compose ------------------------------------------------------------------------------------
def check_compose(*paths: Path) -> subprocess.CompletedProcess:
    return run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *map(str, paths))


def test_compose_files_match_the_compose_specification():
    done = check_compose(*COMPOSE_FILES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_schema_check_would_catch_a_typo(tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["dspark"]["port"] = ["8000:8000"]  # `ports` misspelt
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(compose))
    assert check_compose(bad).returncode != 0


def compose_services() -> dict[str, dict]:
    services = {}
    for path in COMPOSE_FILES:
        services.update({f"{path.name}:{k}": v for k, v in yaml.safe_load(path.read_text())["services"].items()})
    return services


def test_compose_files_point_at_files_that_exist():
    for name, service in compose_services().items():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", ()):
            source = volume.split(":")[0].replace("${DSPARK_MODELS_DIR:-./models}", "./models")
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    for path in (DEPLOY / "compose.yaml", DEPLOY / "compose.cpu.yaml"):
        compose = yaml.safe_load(path.read_text())
        assert compose["include"] == ["monitoring.yaml"] and "dspark" in compose["services"]
    gpu = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["dspark"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_the_compose_service_and_grafana_loads_the_dashboard():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "dspark" and job["static_configs"][0]["targets"] == ["dspark:8000"]
    grafana = yaml.safe_load((DEPLOY / "monitoring.yaml").read_text())["services"]["grafana"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dspark.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{dashboards_dir}:ro" in grafana["volumes"]
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


# ---- Kubernetes ---------------------------------------------------------------------------------
def k8s_documents() -> dict[str, dict]:
    docs = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schemas(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_schema_check_would_catch_a_wrong_field():
    deployment = k8s_documents()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_deployment_requests_a_gpu_probes_health_and_is_scraped():
    docs = k8s_documents()
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert container["ports"][0] == {"name": "http", "containerPort": 8000}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert docs["Service"]["spec"]["selector"] == pod["metadata"]["labels"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_autoscaler_follows_the_sla_recording_rule():
    docs = k8s_documents()
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (metric,) = hpa["metrics"]
    adapter = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["externalRules"][0]
    assert metric["external"]["metric"]["name"] == adapter["name"]["as"]
    assert adapter["seriesQuery"].strip("'") in {r.get("record") for r in rules()}


# ---- Prometheus files and the dashboard ----------------------------------------------------------
def test_promtool_accepts_config_and_rules():
    require_prometheus()
    for args in (("check", "config", str(PROMETHEUS_CONFIG)), ("check", "rules", str(RULES))):
        done = run("promtool", *args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_compares_a_signal_with_a_threshold():
    alerts = [r for r in rules() if "alert" in r]
    assert {"DSparkUserSpeedBelowSLA", "DSparkSLAAttainmentLow"} <= {a["alert"] for a in alerts}
    for alert in alerts:
        signal, _, threshold = comparison_sides(alert["expr"])
        assert signal and threshold, alert["alert"]
        assert alert["labels"]["severity"] in ("page", "ticket") and alert["annotations"]["summary"]
    assert comparison_sides('a{x=~"<"} > on() max(b > 0)') == ('a{x=~"<"}', ">", "on() max(b > 0)")


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    for title, expr in dashboard_queries():
        assert "$" not in expr, f"{title}: unknown variable in {expr}"


def test_dashboard_has_the_sla_panels_the_issue_asks_for():
    queries = dashboard_queries()
    titles = {title for title, _ in queries}
    assert {"Per-user decode tokens/s vs SLA", "Aggregate tokens/s", "Acceptance length",
            "Acceptance per position", "Verification length", "Time to first token",
            "Inter-token latency", "Queue time"} <= titles
    speed = [e for t, e in queries if t == "Per-user decode tokens/s vs SLA"]
    assert any("dspark_sla_user_decode_tokens_per_second" in e for e in speed)
    assert sum("dspark_user_decode_tokens_per_second_bucket" in e for e in speed) == 3


def test_dashboard_and_rules_use_only_exported_metrics_and_show_every_one():
    page = ServerMetrics().render().decode()
    exported = {n for n in re.findall(r"^# TYPE (\S+) \S+$", page, re.M) if not n.endswith("_created")}
    text = " ".join(e for _, e in dashboard_queries()) + " " + " ".join(r["expr"] for r in rules())
    used = set(re.findall(r"\b(dspark_[a-z0-9_]+)", text))
    samples = set(re.findall(r"^(dspark_[a-z0-9_]+)", page, re.M)) | exported
    assert used <= samples, f"queried but never exported: {used - samples}"
    shown = {name for name in exported if any(u == name or u.startswith(name + "_") for u in used)}
    assert exported == shown, f"exported but on no panel or rule: {exported - shown}"
