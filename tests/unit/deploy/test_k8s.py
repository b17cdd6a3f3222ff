"""deploy/k8s: valid against the Kubernetes OpenAPI schemas (offline, from kubernetes-validate) and
consistent with each other and with the image (probes, ports, user, shutdown timing, autoscaling)."""

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from app.metrics import Metrics

from .conftest import TEXTGEN_SETTINGS, dockerfile_env

K8S_VERSION = "1.30"  # oldest Kubernetes the manifests are checked against; also checked at the newest
# Custom resources kubernetes-validate has no schema for: the Gateway API Inference Extension's.
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): Path(__file__).parent / "schemas" / "inferencepool-v1.json"
}


def _crd_validator(doc: dict) -> jsonschema.Draft202012Validator:
    schema = json.loads(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])].read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("version", [K8S_VERSION, "latest"])
def test_manifests_match_the_kubernetes_schemas(k8s_docs, version):
    if version == "latest":
        version = kubernetes_validate.latest_version()
    assert k8s_docs, "no manifests in deploy/k8s"
    for path, doc in k8s_docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            errors = sorted(_crd_validator(doc).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{path.name} ({doc['kind']}): {[(list(e.path), e.message) for e in errors]}"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name} ({doc['kind']}) at {'/'.join(map(str, e.path))}: {e.message}")


def test_validator_rejects_a_broken_deployment(k8s):
    broken = copy.deepcopy(k8s["Deployment"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["httpGet"]["pathh"] = "/health"  # typo: unknown field (strict)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(k8s["Deployment"])
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_expected_kinds(k8s):
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret", "InferencePool"} <= set(k8s)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda pool: pool["spec"]["targetPorts"][0].update(number=70000),  # out of range
        lambda pool: pool["spec"].update(targetPort=8000),  # unknown field (typo)
        lambda pool: pool["spec"]["endpointPickerRef"].pop("port"),  # a Service reference needs a port
        lambda pool: pool["spec"]["endpointPickerRef"].update(failureMode="Open"),  # not in the enum
        lambda pool: pool["spec"].pop("selector"),
    ],
)
def test_inference_pool_schema_rejects_broken_pools(k8s, breakage):
    broken = copy.deepcopy(k8s["InferencePool"])
    breakage(broken)
    assert list(_crd_validator(broken).iter_errors(broken))


def test_inference_pool_selects_the_pods_on_the_serving_port(k8s):
    pool = k8s["InferencePool"]["spec"]
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["selector"]["matchLabels"] == k8s["Service"]["spec"]["selector"]
    (port,) = pool["targetPorts"]
    assert port["number"] == 8000 == _container(k8s)["ports"][0]["containerPort"]


def test_the_metrics_an_endpoint_picker_reads_are_exported():
    """The EPP's defaults are vLLM's names; textgen must export each one."""
    exported = {family.name for family in Metrics().registry.collect()}
    assert {
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
    } <= exported


def _container(k8s) -> dict:
    (container,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _port_number(container, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_probes(k8s):
    c = _container(k8s)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    # model download/load, or the demo model build (~3 min): at least 5 minutes before liveness applies
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert _port_number(c, c[probe]["httpGet"]["port"]) == 8000
        assert c[probe]["timeoutSeconds"] < c[probe]["periodSeconds"]


def test_ports_match_the_image(k8s, dockerfile):
    c = _container(k8s)
    exposed = {int(a) for k, a in dockerfile if k == "EXPOSE"}
    assert {p["containerPort"] for p in c["ports"]} == exposed == {8000}
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("TEXTGEN_HOST", dockerfile_env(dockerfile)["TEXTGEN_HOST"]) == "0.0.0.0"
    assert int(env.get("TEXTGEN_PORT", 8000)) == 8000


def test_runs_as_the_images_non_root_user(k8s, dockerfile):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    image_uid = int([a for k, a in dockerfile if k == "USER"][-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid != 0
    assert pod["securityContext"]["fsGroup"] == image_uid
    c = _container(k8s)["securityContext"]
    assert c["allowPrivilegeEscalation"] is False
    assert c["capabilities"]["drop"] == ["ALL"]


def test_writable_paths_are_volumes(k8s, dockerfile):
    """With a read-only root filesystem the cache (HF + textgen) and /tmp must be mounted volumes."""
    c = _container(k8s)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert dockerfile_env(dockerfile)["XDG_CACHE_HOME"] in mounts
    if c["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts
    volumes = {v["name"]: v for v in k8s["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts.values()) <= set(volumes)


def test_grace_period_exceeds_the_shutdown_timeout(k8s):
    shutdown = float(k8s["ConfigMap"]["data"]["TEXTGEN_SHUTDOWN_TIMEOUT"])
    # after SIGTERM: the lame duck (still admitting), then the drain
    drain_delay = float(k8s["ConfigMap"]["data"]["TEXTGEN_DRAIN_DELAY"])
    grace = k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = _container(k8s).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    # the grace period counts from the start of preStop; leave a margin for the exit itself
    assert grace >= pre_stop + drain_delay + shutdown + 5


def test_settings_are_known_textgen_variables(k8s):
    config_keys = set(k8s["ConfigMap"]["data"])
    env_names = {e["name"] for e in _container(k8s).get("env", [])}
    for name in config_keys | env_names:
        if name.startswith("TEXTGEN_"):
            assert name in TEXTGEN_SETTINGS, f"unknown setting {name}"


def test_config_and_secret_references_resolve(k8s):
    c = _container(k8s)
    configmaps = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    assert configmaps == [k8s["ConfigMap"]["metadata"]["name"]]
    secret_volumes = [
        v["secret"]["secretName"] for v in k8s["Deployment"]["spec"]["template"]["spec"]["volumes"] if "secret" in v
    ]
    assert secret_volumes == [k8s["Secret"]["metadata"]["name"]]
    key_file = next(e["value"] for e in c["env"] if e["name"] == "TEXTGEN_API_KEY_FILE")
    secret_mount = next(m for m in c["volumeMounts"] if m["name"] in {"api-keys"})
    directory, _, key = key_file.rpartition("/")
    assert directory == secret_mount["mountPath"]
    assert key in k8s["Secret"].get("stringData", {}) | k8s["Secret"].get("data", {})


def test_resources_and_rollout(k8s):
    c = _container(k8s)
    assert c["resources"]["requests"]["cpu"], "the HPA's CPU utilization is relative to requests.cpu"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    strategy = k8s["Deployment"]["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_service_selects_the_pods(k8s):
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = k8s["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["ports"]
    assert _port_number(_container(k8s), port["targetPort"]) == 8000
    if "PodDisruptionBudget" in k8s:
        assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_hpa_scales_the_deployment_on_cpu(k8s):
    hpa = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s["Deployment"]["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and 0 < cpu[0]["resource"]["target"]["averageUtilization"] <= 100
