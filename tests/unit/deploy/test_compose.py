"""docker-compose.yml: valid against the Compose Specification schema, and wired together (service
names, ports, volumes, health checks, Prometheus target, Grafana provisioning)."""

import copy
import re

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from .conftest import ROOT, TEXTGEN_SETTINGS, dockerfile_env, parse_duration


@pytest.fixture(scope="module")
def compose_validator():
    # The compose-spec JSON schema as vendored (offline) by check-jsonschema.
    schema = get_builtin_schema("vendor.compose-spec")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec(compose_validator, compose):
    assert _errors(compose_validator, compose) == []


def test_gpu_override_matches_the_compose_spec(compose_validator, compose_gpu):
    assert _errors(compose_validator, compose_gpu) == []


def test_validator_rejects_a_broken_compose_file(compose_validator, compose):
    broken = copy.deepcopy(compose)
    broken["services"]["textgen"]["healthcheck"]["intervall"] = "30s"  # typo: unknown key
    broken["services"]["prometheus"]["ports"] = "9090:9090"  # not a list
    assert len(_errors(compose_validator, broken)) >= 2


def _container_ports(service: dict) -> list[int]:
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            ports.append(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def test_every_service_has_ports_volumes_healthcheck_and_a_pinned_image(compose):
    services = compose["services"]
    assert {"textgen", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert service.get("ports"), f"{name}: no ports"
        assert service.get("volumes"), f"{name}: no volumes"
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name}: no healthcheck"
        assert not check.get("disable"), name
        assert parse_duration(check["timeout"]) < parse_duration(check["interval"]), name
        assert service.get("restart") in ("unless-stopped", "always"), name
        image = service.get("image", "")
        if "build" not in service:
            assert re.search(r":[\w.\-]+$", image) and not image.endswith(":latest"), f"{name}: pin {image}"


def test_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service["volumes"]:
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared at the top level"


def test_textgen_service(compose, dockerfile):
    svc = compose["services"]["textgen"]
    assert svc["build"]["context"] == "."
    assert (ROOT / svc["build"].get("dockerfile", "Dockerfile")).is_file()
    assert set(svc["build"]["args"]) <= {"BASE_IMAGE", "TORCH_SPEC", "TORCH_INDEX_URL", "PIP_FIND_LINKS"}
    assert _container_ports(svc) == [8000]

    env = svc["environment"]
    assert isinstance(env, list)
    names = {e.split("=", 1)[0] for e in env}
    assert "TEXTGEN_MODEL" in env, "TEXTGEN_MODEL is passed through from the caller's environment"
    assert {n for n in names if n.startswith("TEXTGEN_")} <= TEXTGEN_SETTINGS
    # the container listens on all interfaces (the image sets it; compose must not undo it)
    assert "TEXTGEN_HOST" not in names or "TEXTGEN_HOST=0.0.0.0" in env

    cache = dockerfile_env(dockerfile)["XDG_CACHE_HOME"]
    assert any(v.split(":")[1] == cache for v in svc["volumes"]), "the HF/textgen cache must be a volume"

    check = svc["healthcheck"]
    assert any("/health" in str(part) for part in check["test"])
    assert parse_duration(check["start_period"]) >= 300
    shutdown = float(next(e.split("=", 1)[1] for e in env if e.startswith("TEXTGEN_SHUTDOWN_TIMEOUT=")))
    # TEXTGEN_DRAIN_DELAY (the lame duck, default 5 s) comes before the drain
    delay = float(next((e.split("=", 1)[1] for e in env if e.startswith("TEXTGEN_DRAIN_DELAY=")), 5.0))
    assert parse_duration(svc["stop_grace_period"]) > delay + shutdown


def test_gpu_override_reserves_nvidia_gpus_and_builds_cuda_torch(compose_gpu):
    svc = compose_gpu["services"]["textgen"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "download.pytorch.org/whl/cu" in svc["build"]["args"]["TORCH_INDEX_URL"]
    assert "TEXTGEN_DEVICE=cuda" in svc["environment"]


def test_prometheus_scrapes_the_textgen_service(compose):
    prom_service = compose["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom_service["volumes"]}
    config_path = next(a.split("=", 1)[1] for a in prom_service["command"] if a.startswith("--config.file="))
    assert mounts[config_path] == "./deploy/prometheus/prometheus.yml"

    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "textgen")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    textgen = compose["services"]["textgen"]
    # on the compose network: service name and container port, not the published host port
    assert targets == [f"textgen:{_container_ports(textgen)[0]}"]


def test_grafana_provisioning_matches_mounts_and_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"

    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"] and _container_ports(compose["services"]["prometheus"]) == [9090]

    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/textgen.yml").read_text())
    (provider,) = providers["providers"]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == "./deploy/grafana/dashboards"
    assert (ROOT / "deploy/grafana/dashboards/textgen.json").is_file()
    home = next(e.split("=", 1)[1] for e in grafana["environment"] if e.startswith("GF_DASHBOARDS_DEFAULT_HOME"))
    assert (
        home.startswith(dashboards_dir + "/") and (ROOT / "deploy/grafana/dashboards" / home.rsplit("/")[-1]).is_file()
    )
