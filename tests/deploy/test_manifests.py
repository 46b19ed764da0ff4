"""The Kubernetes manifests (deploy/k8s), checked offline: each Kustomize overlay is rendered with `kubectl
kustomize` and every object validated, strictly (no unknown fields), against the Kubernetes schemas that
kubernetes-validate ships; the KServe InferenceService against KServe's schema (schemas/, generated from KServe's
SDK, its embedded Kubernetes types resolved with the same Kubernetes schemas). Then what the schemas cannot say:
probes on the health endpoints, a grace period that covers the SIGTERM drain, selectors that match, the API keys
from a Secret, the GPU overlay asking for a GPU. No cluster runs here: nothing is applied."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import ValidationError

from lossd.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KSERVE_SCHEMA = Path(__file__).with_name("schemas") / "kserve-inferenceservice-v1beta1.json"
# the oldest Kubernetes with every API used here at v1/v2 that kubernetes-validate ships, and the newest
VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())


def render(overlay: str) -> dict[str, dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (for `kubectl kustomize`) comes with the machine image"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         check=True).stdout
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out)}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request):
    return request.param, render(request.param)


def container(objs: dict) -> dict:
    return objs["Deployment/lossd"]["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_kubernetes(rendered, version):
    _, objs = rendered
    assert set(objs) == {"Deployment/lossd", "Service/lossd", "Service/lossd-headless",
                         "HorizontalPodAutoscaler/lossd", "PodDisruptionBudget/lossd"}
    for obj in objs.values():
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_catches_mistakes(rendered):
    """The validation above can fail: a misspelt field, a wrong type, a missing required field."""
    _, objs = rendered
    for mutate in (lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
                   lambda d: d["spec"].update(replicas="two"),
                   lambda d: d["spec"].pop("selector")):
        broken = copy.deepcopy(objs["Deployment/lossd"])
        mutate(broken)
        with pytest.raises(ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_deployment_probes_ports_and_drain(rendered):
    _, objs = rendered
    dep = objs["Deployment/lossd"]
    c = container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = env_of(c)
    assert ports == {"http": int(env["LOSSD_HTTP_PORT"]), "grpc": int(env["LOSSD_GRPC_PORT"])}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    # every LOSSD_ variable is a setting, and the values parse as the server will parse them
    names = {f"LOSSD_{f.upper()}" for f in Settings.model_fields}
    assert set(env) <= names, set(env) - names
    plain = {k[len("LOSSD_"):].lower(): v for k, v in env.items() if isinstance(v, str)}
    settings = Settings(**plain)
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.drain_seconds > 0 and grace >= settings.drain_seconds + settings.shutdown_grace_seconds + 1
    assert env["LOSSD_API_KEYS"] == {"secretKeyRef": {"name": "lossd-api-keys", "key": "api-keys"}}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_services_hpa_and_pdb_select_the_pods(rendered):
    _, objs = rendered
    pod_labels = objs["Deployment/lossd"]["spec"]["template"]["metadata"]["labels"]
    assert objs["Deployment/lossd"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc, headless = objs["Service/lossd"]["spec"], objs["Service/lossd-headless"]["spec"]
    for spec in (svc, headless):
        assert spec["selector"].items() <= pod_labels.items()
        assert {(p["name"], p["targetPort"]) for p in spec["ports"]} == {("http", "http"), ("grpc", "grpc")}
    assert headless["clusterIP"] == "None" and "clusterIP" not in svc
    assert objs["PodDisruptionBudget/lossd"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = objs["HorizontalPodAutoscaler/lossd"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lossd"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_cpu_and_gpu_resources(rendered):
    overlay, objs = rendered
    c = container(objs)
    res, env = c["resources"], env_of(c)
    assert [e["name"] for e in c["env"]].count("LOSSD_DEVICE") == 1
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= res[kind].keys()
    if overlay == "gpu":
        assert res["limits"]["nvidia.com/gpu"] == "1" and env["LOSSD_DEVICE"] == "cuda"
        tolerations = objs["Deployment/lossd"]["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert "nvidia.com/gpu" not in res["limits"] and env["LOSSD_DEVICE"] == "cpu"


# ------------------------------------------------------------------------------------------------ KServe
@pytest.fixture(scope="module")
def kserve_validator():
    k8s_defs = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / \
        f"v{VERSIONS[-1]}-local-strict" / "_definitions.json"
    defs = json.loads(k8s_defs.read_text())
    registry = referencing.Registry().with_resource(defs["$id"], referencing.Resource.from_contents(defs))
    schema = json.loads(KSERVE_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture(scope="module")
def isvc():
    return yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())


def test_inference_service_is_valid(isvc, kserve_validator):
    kserve_validator.validate(isvc)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"


def test_the_kserve_schema_catches_mistakes(isvc, kserve_validator):
    """A misspelt predictor field, a wrong type, and a misspelt field inside the container (checked through the
    Kubernetes Container schema) are all refused."""
    for mutate in (lambda d: d["spec"]["predictor"].update(minReplica=1),
                   lambda d: d["spec"]["predictor"].update(scaleTarget="70"),
                   lambda d: d["spec"]["predictor"]["containers"][0].update(readinesProbe={}),
                   lambda d: d["spec"].pop("predictor")):
        broken = copy.deepcopy(isvc)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            kserve_validator.validate(broken)


def test_inference_service_serves_oip_on_its_port(isvc):
    pred = isvc["spec"]["predictor"]
    c = pred["containers"][0]
    env = env_of(c)
    port = c["ports"][0]["containerPort"]
    assert int(env["LOSSD_HTTP_PORT"]) == port and len(c["ports"]) == 1
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    settings = Settings(**{k[len("LOSSD_"):].lower(): v for k, v in env.items() if isinstance(v, str)})
    assert pred["terminationGracePeriodSeconds"] >= settings.drain_seconds + settings.shutdown_grace_seconds + 1
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
