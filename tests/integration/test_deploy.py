"""deploy/: the alert rules pass promtool and their unit tests, and the dashboard, compose
file and Kubernetes manifests name only metrics, settings and commands that exist.

Docker and Kubernetes are not available to the tests; the files are loaded and checked
against the code instead, so a renamed metric, setting or command fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from prometheus_client import CollectorRegistry

from consumer.metrics import WebhookMetrics
from handlers.builtin.crm.metrics import crm_metrics
from handlers.builtin.metrics import PublicationMetrics, PublicationMetricsSettings
from handlers.reconcile.metrics import ReconcileMetrics
from handlers.types import HandlerContext
from handlers.worker.metrics import WorkerMetrics
from pubrelay.cli import build_parser
from pubrelay.data_dir_metrics import DataDirSpace
from pubrelay.loop_watch import LoopWatch
from pubrelay.settings import describe_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "pubrelay.json"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

METRIC_RE = re.compile(r"\bpubrelay[_:][A-Za-z0-9_:]*")
PROMTOOL_TIMEOUT_S = 60


# --- helpers --------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: `make test` installs it (Debian package "
            "`prometheus`; by hand: apt-get install -y prometheus)",
            pytrace=False,
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


def exported_metric_names() -> set[str]:
    """Every sample name the code can expose, from the metric objects on a fresh registry."""
    registry = CollectorRegistry()
    WebhookMetrics(registry)
    WorkerMetrics(registry)
    PublicationMetrics(registry)
    ReconcileMetrics(registry)
    DataDirSpace(Path(), registry)
    LoopWatch(registry)
    crm_metrics(
        HandlerContext(
            name="crm",
            data_dir=Path(),
            metrics_registry=registry,
            logger=structlog.get_logger(),
            topic_prefix="voucherify.",
        )
    )
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes[family.type]
        if family.name.startswith("pubrelay_")
    }


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in load_rules() if "alert" in rule}


def panels() -> Iterator[dict[str, Any]]:
    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def known_settings() -> set[str]:
    names = {name for name, _, _ in describe_settings()}
    names |= {
        name for name, _, _ in describe_settings(PublicationMetricsSettings, "PUBRELAY_METRICS__")
    }
    return names


def cli_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices is not None
    return set(sub.choices)


# --- Prometheus rules -----------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_prometheus_config_is_valid_and_loads_the_rules() -> None:
    result = run_promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    targets = {
        t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    }
    assert targets == {"webhook:8080", "worker:8080"}


def test_every_alert_is_tested_firing_and_quiet() -> None:
    data = yaml.safe_load(RULES_TEST.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in data["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts()) - fires == set(), "alerts never shown firing"
    assert set(alerts()) - quiet == set(), "alerts never shown staying quiet"


def test_every_alert_says_what_happened_how_bad_and_what_to_do() -> None:
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook"}, name
        assert f"deploy/README.md#{name.lower()}" in annotations["runbook"], name


def test_the_runbook_anchors_exist_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name in alerts():
        assert f"### {name}\n" in readme, name


def test_the_rules_read_only_metrics_the_code_exports() -> None:
    recorded = {rule["record"] for rule in load_rules() if "record" in rule}
    known = exported_metric_names() | recorded
    used = {name for rule in load_rules() for name in METRIC_RE.findall(rule["expr"])}
    assert used - known == set()


def test_the_webhook_unavailable_alert_is_critical_within_minutes() -> None:
    # Voucherify pauses a webhook after 12 failures over ~24 h: page long before.
    rule = alerts()["PubrelayWebhookUnavailable"]
    assert rule["labels"]["severity"] == "critical"
    assert rule["for"] == "5m"
    assert 'outcome=~"unavailable|error"' in rule["expr"]


# --- Grafana dashboard ----------------------------------------------------------------


def test_every_dashboard_query_reads_metrics_the_code_exports() -> None:
    exported = exported_metric_names()
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        used = set(METRIC_RE.findall(expr))
        assert used, expr
        assert used - exported == set(), expr


def test_the_dashboard_shows_what_ops_asked_for() -> None:
    text = "\n".join(dashboard_exprs())
    wanted = [
        "sum by (channel) (rate(pubrelay_publications_total",
        "sum by (campaign) (rate(pubrelay_publications_total",
        "sum by (outcome) (rate(pubrelay_webhook_requests_total",
        "sum by (reason) (increase(pubrelay_webhook_quarantined_total",
        'outcome="retried"',
        'outcome="dead_lettered"',
        'outcome="handled"',
        "pubrelay_consumer_lag",
        "histogram_quantile(0.5, sum by (le) (rate(pubrelay_webhook_request_duration_seconds",
        "histogram_quantile(0.99, sum by (le) (rate(pubrelay_webhook_request_duration_seconds",
        "pubrelay_handler_duration_seconds_bucket",
        "pubrelay_handler_event_age_seconds_bucket",
        "sum by (instance) (increase(pubrelay_event_loop_blocked_seconds_count",
        "min by (instance) (pubrelay_data_dir_free_bytes / pubrelay_data_dir_size_bytes)",
    ]
    assert [w for w in wanted if w not in text] == []


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule expressions: wrap each query in a recording rule.
    grafana_vars = {"$__rate_interval": "5m", "$event_type": ".*", "$handler": ".*"}
    rules = []
    for n, query in enumerate(dashboard_exprs()):
        expr = query
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, query
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_grafana_provisioning_loads_the_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((provisioning / "dashboards" / "pubrelay.yaml").read_text())
    path = boards["providers"][0]["options"]["path"]
    mounts = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["volumes"]
    assert f"./grafana/pubrelay.json:{path}/pubrelay.json:ro" in mounts


def test_dashboard_panels_have_unique_ids_a_place_and_the_datasource_variable() -> None:
    all_panels = list(panels())
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for panel in all_panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables == {"datasource", "event_type", "handler"}


# --- compose and image ----------------------------------------------------------------


def test_compose_runs_webhook_and_worker_on_a_kraft_kafka() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    for name, command in (("webhook", ["webhook"]), ("worker", ["worker"])):
        service = services[name]
        assert service["command"] == command, name
        assert service["environment"]["PUBRELAY_BUS__URL"] == "kafka://kafka:9092", name
        assert service["env_file"] == "pubrelay.env", name
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy", name
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile", name
    assert services["kafka"]["healthcheck"]["test"]
    assert services["kafka"]["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(services["webhook"]["healthcheck"]["test"])
    assert (DEPLOY / "pubrelay.env.example").is_file()


def test_compose_and_configmap_set_only_real_settings() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    names = {
        key
        for service in compose["services"].values()
        for key in service.get("environment", {})
        if key.startswith("PUBRELAY_")
    }
    names |= set(k8s("ConfigMap", "pubrelay")["data"])
    names |= set(k8s("Secret", "pubrelay-secrets")["stringData"])
    example = (DEPLOY / "pubrelay.env.example").read_text().splitlines()
    names |= {line.split("=", 1)[0] for line in example if line.startswith("PUBRELAY_")}
    assert names - known_settings() == set()


def test_the_deployed_commands_exist_in_the_cli() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    used = {compose["webhook"]["command"][0], compose["worker"]["command"][0]}
    for name in ("pubrelay-webhook", "pubrelay-worker"):
        used.add(k8s("Deployment", name)["spec"]["template"]["spec"]["containers"][0]["args"][0])
    assert used - cli_commands() == set()


def test_the_image_runs_pubrelay_serve_as_a_non_root_user() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    text = "\n".join(lines)
    froms = [line for line in lines if line.startswith("FROM ")]
    assert all(line.startswith("FROM python:3.11-slim") for line in froms)
    # The project, and its dependencies exactly as uv.lock pins them (hashes checked), with
    # the uv version the Makefile uses.
    assert "pip install --no-deps ." in text
    assert "COPY pyproject.toml uv.lock" in text
    assert "pip install --require-hashes -r requirements.txt" in text
    uv_version = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert uv_version is not None
    assert f"uv=={uv_version.group(1)}" in text
    assert "PUBRELAY_HTTP__HOST=0.0.0.0" in text
    user = next(line for line in reversed(lines) if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in {"0", "root"}
    assert lines[-2:] == ['ENTRYPOINT ["pubrelay"]', 'CMD ["serve"]']
    assert "HEALTHCHECK" in text
    assert "/healthz" in text


def _dockerfile_steps() -> list[str]:
    """The build stage's instructions, each on one line (continuations joined)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()[:1] not in "#"]


def test_the_image_exports_its_dependencies_from_what_it_has_copied(tmp_path: Path) -> None:
    """The build's `uv export` runs with only the files copied before it: the lock file
    also names the example plugin the tests install from tests/, which the image has not
    (`--locked` looked for it and stopped every `docker build`)."""
    uv = ROOT / ".tools" / f"uv-{_makefile_uv_version()}" / "bin" / "uv"
    if not uv.exists():
        pytest.skip(f"{uv.relative_to(ROOT)} is installed by `make test`")
    steps = _dockerfile_steps()
    export = next(step for step in steps if "uv export" in step)
    copied = next(
        step.split()[1:-1]
        for step in steps[: steps.index(export)]
        if step.startswith("COPY ") and "uv.lock" in step
    )
    for name in copied:
        shutil.copy(ROOT / name, tmp_path / name)
    args = export.split("uv export", 1)[1].split(">", 1)[0].split()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "UV_OFFLINE": "1"}

    def export_in(where: Path) -> subprocess.CompletedProcess[str]:
        command = [str(uv), "export", *args]
        return subprocess.run(
            command, cwd=where, env=env, capture_output=True, text=True, check=False
        )

    image, checkout = export_in(tmp_path), export_in(ROOT)
    assert image.returncode == 0, image.stderr
    assert checkout.returncode == 0, checkout.stderr
    assert image.stdout == checkout.stdout
    assert re.search(r"^aiohttp==\S+ \\$", image.stdout, re.M)
    assert "--hash=sha256:" in image.stdout


def _makefile_uv_version() -> str:
    found = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found is not None
    return found.group(1)


# --- Kubernetes -----------------------------------------------------------------------


def test_every_manifest_has_a_kind_a_name_and_the_namespace() -> None:
    docs = k8s_docs()
    assert {d["kind"] for d in docs} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }
    for doc in docs:
        assert doc["apiVersion"], doc
        assert doc["metadata"]["name"], doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "pubrelay", doc["metadata"]["name"]


def test_kustomization_applies_everything_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.template.yaml"}


def test_the_secret_template_holds_no_real_secret() -> None:
    secret = k8s("Secret", "pubrelay-secrets")
    assert "data" not in secret
    assert all("REPLACE_ME" in value for value in secret["stringData"].values())


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


@pytest.mark.parametrize("name", ["pubrelay-webhook", "pubrelay-worker"])
def test_pods_run_non_root_on_a_read_only_filesystem_with_a_writable_tmp(name: str) -> None:
    deployment = k8s("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    # Group ownership set once, on a new volume: not the data files' 0600 at every mount.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "/var/lib/pubrelay" in mounts
    assert set(main["resources"]) == {"requests", "limits"}
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(main["ports"][0]["containerPort"])
    refs = {next(iter(ref.values()))["name"] for ref in main["envFrom"]}
    assert refs == {"pubrelay", "pubrelay-secrets"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_two_webhook_replicas_behind_the_service_and_the_disruption_budget() -> None:
    webhook = k8s("Deployment", "pubrelay-webhook")
    labels = webhook["spec"]["template"]["metadata"]["labels"]
    assert webhook["spec"]["replicas"] == 2
    service = k8s("Service", "pubrelay-webhook")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == container(webhook)["ports"][0]["name"]
    pdb = k8s("PodDisruptionBudget", "pubrelay-webhook")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1


def test_the_worker_keeps_its_ledger_on_a_claim_and_never_runs_twice_on_it() -> None:
    worker = k8s("Deployment", "pubrelay-worker")
    assert worker["spec"]["replicas"] == 1
    assert worker["spec"]["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert k8s("PersistentVolumeClaim", claim)
