"""deploy/kubernetes/, offline: every object the base and the example overlay render to
is valid against the Kubernetes API's schemas (kubernetes-validate, bundled schemas) or
KEDA's, and the invariants the deployment depends on hold.  The autoscaler's query
itself runs against a real database in tests/integration/test_autoscaling.py."""

from __future__ import annotations

import base64
import copy
import os
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import orjson
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from tenantry import cli, config

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
TREES = ("base", "overlays/example")
KEDA_SCHEMA = Path(__file__).with_name("keda_v1alpha1.schema.json")
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")
# The oldest Kubernetes the manifests claim to work on, and the newest schemas bundled.
K8S_VERSIONS = ("1.29.0", kv_utils.latest_version())

Doc = dict[str, Any]


def _render_command(tree: Path) -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(tree)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(tree)]
    pytest.skip("kubectl (with kustomize) not installed: cannot render deploy/kubernetes")


@cache
def _rendered(tree: str) -> tuple[Doc, ...]:
    command = _render_command(KUBE / tree)
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{shlex.join(command)}: {done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(tree: str) -> list[Doc]:
    """The objects `kubectl apply -k` would send (a copy each time: tests may edit)."""
    return copy.deepcopy(list(_rendered(tree)))


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def keda_schema() -> Doc:
    schema: Doc = orjson.loads(KEDA_SCHEMA.read_bytes())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def keda_errors(doc: Doc) -> list[str]:
    """Against the definition of the object's kind in the KEDA schema file."""
    schema = {**keda_schema(), "$ref": f"#/$defs/{doc['kind']}"}
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def validate(doc: Doc) -> None:
    """Raises with the reasons if the API server (or KEDA's) would refuse `doc`."""
    if doc["kind"] in KEDA_KINDS:
        errors = keda_errors(doc)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def container_env(docs: list[Doc], doc: Doc) -> dict[str, str]:
    """The container's environment as the process sees it: ConfigMaps (rendered here)
    and plain values; values from Secrets as placeholders (the base has none)."""
    (container,) = pod_spec(doc)["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "postgresql://placeholder@db/app")
    return env


def deployments(docs: list[Doc]) -> dict[str, Doc]:
    """The HTTP-only and the worker-only deployments, by the flag that makes them so."""
    found: dict[str, Doc] = {}
    for d in docs:
        if d["kind"] == "Deployment":
            (container,) = pod_spec(d)["containers"]
            args = cli.build_parser().parse_args(container["args"])
            assert args.command == "run"
            assert args.no_http != args.no_worker, d["metadata"]["name"]
            found["worker" if args.no_http else "http"] = d
    assert set(found) == {"http", "worker"}
    return found


def prestop_seconds(container: Doc) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


# --- schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_every_object_is_valid_against_its_schema(tree: str) -> None:
    docs = render(tree)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Job", "Service", "PodDisruptionBudget", *KEDA_KINDS} <= kinds
    for doc in docs:
        validate(doc)


def test_the_validators_refuse_what_the_cluster_would() -> None:
    """Each check can fail: a misspelt field, a wrong type, a KEDA trigger without its
    target value, an unknown scaler setting."""
    docs = render("overlays/example")
    deployment = one(docs, "Deployment", "tenantry-http")
    pod_spec(deployment)["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    job = one(docs, "Job", "tenantry-migrate")
    job["spec"]["backoffLimit"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)
    scaled = one(docs, "ScaledObject", "tenantry-worker")
    trigger = scaled["spec"]["triggers"][0]
    trigger["metadata"]["activationTargetQuerValue"] = "0"
    assert any("activationTargetQuerValue" in e for e in keda_errors(scaled))
    del trigger["metadata"]["activationTargetQuerValue"], trigger["metadata"]["targetQueryValue"]
    assert any("targetQueryValue" in e for e in keda_errors(scaled))
    auth = one(docs, "TriggerAuthentication", "tenantry-metrics")
    auth["spec"]["secretTargetRef"][0].pop("key")
    assert keda_errors(auth)


def test_keda_objects_against_kedas_own_crds() -> None:
    """Where KEDA's CRDs are at hand (TENANTRY_KEDA_CRDS: a folder with
    keda.sh_scaledobjects.yaml and keda.sh_triggerauthentications.yaml), their
    openAPIV3Schema too.  The project does not vendor them."""
    folder = os.environ.get("TENANTRY_KEDA_CRDS")
    if not folder:
        pytest.skip("TENANTRY_KEDA_CRDS not set: KEDA's CRD files are not installed here")
    docs = render("overlays/example")
    for kind, file in (
        ("ScaledObject", "keda.sh_scaledobjects.yaml"),
        ("TriggerAuthentication", "keda.sh_triggerauthentications.yaml"),
    ):
        crd = yaml.safe_load((Path(folder) / file).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        schema = version["schema"]["openAPIV3Schema"]
        for doc in (d for d in docs if d["kind"] == kind):
            jsonschema.Draft4Validator(schema).validate(doc)


# --- invariants --------------------------------------------------------------------------


@pytest.mark.parametrize("tree", TREES)
def test_the_stop_is_graceful(tree: str) -> None:
    """The kubelet's SIGKILL comes after the preStop pause and the whole shutdown grace;
    the HTTP pods pause first so that the Service stops sending to them."""
    docs = render(tree)
    for role, deployment in deployments(docs).items():
        (container,) = pod_spec(deployment)["containers"]
        settings = config.from_env(container_env(docs, deployment))
        pause = prestop_seconds(container)
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace > settings.shutdown_grace + pause, role
        if role == "http":
            assert pause >= 3
        # The processes never migrate: the Job does, with the only admin login.
        assert "--no-migrate" in container["args"] or not settings.migrate_on_start
        assert "TENANTRY_ADMIN_URL" not in container_env(docs, deployment)


@pytest.mark.parametrize("tree", TREES)
def test_the_probes_ask_the_service(tree: str) -> None:
    docs = render(tree)
    for role, deployment in deployments(docs).items():
        (container,) = pod_spec(deployment)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        settings = config.from_env(container_env(docs, deployment))
        assert ports == {"http": settings.port}, role
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert settings.host == "0.0.0.0"


@pytest.mark.parametrize("tree", TREES)
def test_every_pod_runs_locked_down(tree: str) -> None:
    docs = render(tree)
    pods = [d for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 3
    for doc in pods:
        spec = pod_spec(doc)
        name = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
            # What the process writes goes to emptyDirs: /tmp and the data folder.
            settings = config.from_env(container_env(docs, doc))
            writable = {
                m["mountPath"]: volumes[m["name"]]
                for m in container["volumeMounts"]
                if "emptyDir" in volumes[m["name"]]
            }
            assert {"/tmp", str(settings.data_dir)} <= set(writable), name


@pytest.mark.parametrize("tree", TREES)
def test_the_worker_and_http_deployments_scale_apart(tree: str) -> None:
    docs = render(tree)
    found = deployments(docs)
    worker, http = found["worker"], found["http"]
    assert "--no-http" in pod_spec(worker)["containers"][0]["args"]
    assert "--no-worker" in pod_spec(http)["containers"][0]["args"]
    labels = {r: d["spec"]["template"]["metadata"]["labels"] for r, d in found.items()}
    for role, deployment in found.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels[role].items()
        other = labels["http" if role == "worker" else "worker"]
        assert not selector.items() <= other.items(), "a selector spans both deployments"
    # The Service reaches the HTTP pods only, on their named port.
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["selector"].items() <= labels["http"].items()
    assert not service["spec"]["selector"].items() <= labels["worker"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    # One disruption budget each; the workers' allows draining at zero replicas.
    budgets = {
        role: [
            b
            for b in docs
            if b["kind"] == "PodDisruptionBudget"
            and b["spec"]["selector"]["matchLabels"].items() <= labels[role].items()
        ]
        for role in found
    }
    assert len(budgets["http"]) == len(budgets["worker"]) == 1
    assert budgets["http"][0]["spec"]["minAvailable"] >= 1
    assert "minAvailable" not in budgets["worker"][0]["spec"]


@pytest.mark.parametrize("tree", TREES)
def test_the_autoscaler_counts_the_worker_deployments_queues(tree: str) -> None:
    docs = render(tree)
    worker = deployments(docs)["worker"]
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": worker["metadata"]["name"],
    }
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    assert float(metadata["activationTargetQueryValue"]) >= 0
    assert float(metadata["targetQueryValue"]) > 0
    # Exactly the function, over the queues the worker deployment works.
    queues = config.from_env(container_env(docs, worker)).queues
    listed = ", ".join("'" + q.replace("'", "''") + "'" for q in queues)
    assert metadata["query"] == f"SELECT tenantry.worker_demand({listed})"
    # Its connection comes from a Secret, through a TriggerAuthentication: the same
    # Secret key the migrate Job creates the metrics login from.
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection"
    assert not {"host", "userName", "connectionFromEnv", "passwordFromEnv"} & set(metadata)
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (migrate,) = pod_spec(job)["containers"]
    assert migrate["args"] == ["migrate"]
    env = {e["name"]: e for e in migrate["env"]}
    assert env["TENANTRY_METRICS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": ref["name"],
        "key": ref["key"],
    }
    assert "secretKeyRef" in env["TENANTRY_ADMIN_URL"]["valueFrom"]


def test_the_example_overlay_makes_every_secret_it_references_with_placeholders() -> None:
    docs = render("overlays/example")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    referenced: set[tuple[str, str | None]] = set()
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            for c in pod_spec(doc)["containers"]:
                referenced |= {
                    (s["secretRef"]["name"], None) for s in c.get("envFrom", []) if "secretRef" in s
                }
                referenced |= {
                    (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                    for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})
                }
        if doc["kind"] == "TriggerAuthentication":
            referenced |= {(r["name"], r["key"]) for r in doc["spec"]["secretTargetRef"]}
    for name, key in referenced:
        assert name in secrets, name
        if key is not None:
            assert key in secrets[name]["data"], (name, key)
    for secret in secrets.values():
        for key, value in secret["data"].items():
            assert "CHANGE_ME" in base64.b64decode(value).decode(), (secret, key)
    # Every image is the one the overlay names, pinned to a tag.
    images = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
        for c in pod_spec(d)["containers"]
    }
    assert len(images) == 1 and not images.pop().endswith(":latest")
