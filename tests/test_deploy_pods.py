"""The chart's workloads, for real: `helm template` of deploy/helm/kubesentiment with the image
`make containerize` builds (its onnx flavour: the chart's default back end needs no more), played
with `podman kube play` against a real PostgreSQL, Tansu and OpenBao started on this host. `make
deploy-test` runs it (marker `container`).

podman 4.3 is not Kubernetes; where it differs, the rendered objects are adapted here, never the
chart (each adaptation says why in `for_podman`):
- a Deployment becomes Pods: kube play makes one pod of a Deployment whatever its replicas, and
  gives an init container in a Deployment restart policy `always`, so it loops; the worker runs
  as a Pod with `restartPolicy: OnFailure`, its init container once;
- emptyDirs become named volumes shared by every pod that names them: each pod gets its own;
- a Secret is a podman secret holding a JSON map of base64 values (a played `kind: Secret`
  does not resolve for env);
- objects kube play ignores or does not know (Service, PDB, HPA, NetworkPolicy, ...) are left
  out;
- containers lose their `ports`: podman publishes every containerPort on all of the host's
  addresses, where two replicas collide; the pods are reached at their own addresses instead;
- the Vault run logs in with a token: the chart's Kubernetes auth method needs a Kubernetes API
  server to review the pod's service account token, and there is none.
Probes with named ports are dropped by podman (and, without systemd, never run): the probe
endpoints are called on their declared ports from here instead.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devtools.helm_tool import helm_binary
from devtools.local_kafka import TansuBroker, collect, create_topics, produce, sources
from kubesentiment.settings import get_settings
from tests.conftest import OpenBao, podman, postgres_cluster

pytestmark = pytest.mark.container
CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "kubesentiment"
NETWORK = "podman"  # podman's default bridge, where the pods are played and connect from
PG_PORT, BROKER_PORT, VAULT_PORT = 15436, 19240, 18212
KEYS = {"ci": "ci-deploy-key-8f1c2e9b7a4d", "vaulted": "vaulted-key-5b3e8d1a9c72"}
LEFT_OUT = {
    "Service",
    "ServiceAccount",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    "ServiceMonitor",
    "PrometheusRule",
    "ScaledObject",
    "Ingress",
}
TOPICS = get_settings().kafka_topics


def host_address() -> str:
    """This host's address on its network, which the pods reach (loopback is theirs)."""
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]


def eventually(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(1)


def render(image: str, values: dict[str, Any], release: str = "ks") -> list[dict[str, Any]]:
    """The chart's objects for `image` (the onnx flavour's tag ends in -onnx: image.flavor)."""
    repository, tag = image.rsplit(":", 1)
    flavor = "onnx" if tag.endswith("-onnx") else "full"
    values = {
        **values,
        "image": {
            "repository": repository,
            "tag": tag.removesuffix("-onnx"),
            "flavor": flavor,
            "pullPolicy": "Never",
        },
    }
    rendered = subprocess.run(
        [str(helm_binary()), "template", release, str(CHART), "-f", "-"],
        input=yaml.safe_dump(values),
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def for_podman(docs: list[dict[str, Any]], api_pods: int, vault_token: bool) -> list[dict]:
    """The rendered objects as podman 4.3 can play them (see the module's docstring)."""
    played: list[dict[str, Any]] = []
    for doc in docs:
        if doc["kind"] in LEFT_OUT:
            continue
        if doc["kind"] != "Deployment":
            played.append(doc)
            continue
        component = doc["metadata"]["name"].rsplit("-", 1)[1]
        copies = api_pods if component == "api" else 1
        for number in range(copies):
            name = f"{doc['metadata']['name']}-{number}"
            spec = copy.deepcopy(doc["spec"]["template"]["spec"])
            spec["restartPolicy"] = "Always" if component == "api" else "OnFailure"
            own_volumes(name, spec)
            for container in spec["containers"]:
                container.pop("ports", None)
            if vault_token:
                for container in spec["containers"]:
                    log_in_with_a_token(container, secret_name(docs))
            played.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "labels": doc["spec"]["template"]["metadata"]["labels"],
                    },
                    "spec": spec,
                }
            )
    return played


def own_volumes(pod: str, spec: dict[str, Any]) -> None:
    """A pod's emptyDirs named after the pod: podman shares a named volume between pods."""
    renamed = {
        volume["name"]: f"{pod}-{volume['name']}"
        for volume in spec.get("volumes", [])
        if "emptyDir" in volume
    }
    for volume in spec.get("volumes", []):
        volume["name"] = renamed.get(volume["name"], volume["name"])
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])


def secret_of(release: str) -> str:
    """The Secret a release's pods read (secrets.existingSecret): one per release."""
    return f"{release}-secrets"


def secret_name(rendered: list[dict[str, Any]]) -> str:
    return secret_of(rendered[0]["metadata"]["labels"]["app.kubernetes.io/instance"])


def log_in_with_a_token(container: dict[str, Any], secret: str) -> None:
    env = [e for e in container.get("env", []) if e["name"] != "VAULT_AUTH_METHOD"]
    env.append({"name": "VAULT_AUTH_METHOD", "value": "token"})
    token = {"secretKeyRef": {"name": secret, "key": "vault-token"}}
    env.append({"name": "VAULT_TOKEN", "valueFrom": token})
    container["env"] = env


class Played:
    """Objects played with `podman kube play`, and everything podman made for them."""

    def __init__(
        self,
        rendered: list[dict[str, Any]],
        objects: list[dict[str, Any]],
        secret: dict[str, str],
        work: Path,
    ) -> None:
        self.rendered, self.objects = rendered, objects
        self.secret = secret_name(rendered)
        self.file = work / "played.yaml"
        self.file.write_text(yaml.safe_dump_all(objects))
        secret_file = work / "secret.json"
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in secret.items()}
        secret_file.write_text(json.dumps(encoded))
        self.down()  # what an interrupted run may have left
        podman("secret", "create", self.secret, str(secret_file))
        secret_file.unlink()
        try:
            podman("kube", "play", "--network", NETWORK, str(self.file))
        except AssertionError:
            self.down()
            raise

    def pods(self, component: str) -> list[dict[str, Any]]:
        return [
            o
            for o in self.objects
            if o["kind"] == "Pod" and o["metadata"]["name"].count(f"-{component}-")
        ]

    def wait_ready(self) -> None:
        """Every pod's readiness endpoint answers 200; else fail with the containers' logs."""
        for pod in (o for o in self.objects if o["kind"] == "Pod"):
            name = pod["metadata"]["name"]
            url = f"http://{self.address(name)}:{9102 if '-worker-' in name else 3000}/readyz"
            try:
                eventually(lambda url=url: ready(url), f"{name} ready")  # type: ignore[misc]
            except AssertionError as err:
                logs = {c: podman("logs", c, check=False)[-3000:] for c in container_names(pod)}
                raise AssertionError(f"{err}\n{json.dumps(logs, indent=1)}") from None

    def address(self, pod: str) -> str:
        infra = podman("pod", "inspect", pod, "--format", "{{.InfraContainerID}}").strip()
        networks = json.loads(
            podman("inspect", infra, "--format", "{{json .NetworkSettings.Networks}}")
        )
        return str(networks[NETWORK]["IPAddress"])

    def down(self) -> None:
        podman("kube", "down", str(self.file), check=False)
        for pod in (o for o in self.objects if o["kind"] == "Pod"):
            podman("pod", "rm", "-f", "-t", "0", pod["metadata"]["name"], check=False)
        podman("secret", "rm", self.secret, check=False)
        for pod in (o for o in self.objects if o["kind"] == "Pod"):
            for volume in pod["spec"].get("volumes", []):
                podman("volume", "rm", "-f", volume["name"], check=False)


def api_client(played: Played, pod: str, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://{played.address(pod)}:3000",
        headers={"Authorization": f"Bearer {KEYS[key]}"},
        timeout=30,
    )


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def host() -> str:
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: run `make deploy-test` (it installs it)")
    return host_address()


@pytest.fixture(scope="module")
def database(host: str) -> Iterator[str]:
    subnet = podman(
        "network", "inspect", NETWORK, "--format", "{{range .Subnets}}{{.Subnet}}{{end}}"
    )
    with postgres_cluster(PG_PORT, host="0.0.0.0", clients=subnet.strip()) as url:
        yield url.replace("@0.0.0.0:", f"@{host}:")


@pytest.fixture(scope="module")
def broker(host: str) -> Iterator[TansuBroker]:
    started = TansuBroker(BROKER_PORT, host=host).start()
    asyncio.run(create_topics(started.bootstrap, TOPICS))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def chart_pods(
    onnx_image: str,
    host: str,
    database: str,
    broker: TansuBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Played]:
    docs = render(
        onnx_image,
        {
            "jobsDatabase": {
                "type": "postgresql",
                "postgresql": {"existingSecret": secret_of("ks")},
            },
            "secrets": {"existingSecret": secret_of("ks")},
            "config": {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "KAFKA_IDEMPOTENT_PRODUCER": "false",  # Tansu lacks InitProducerId
            },
            "api": {"replicas": 2, "env": {"SERVICE_WORKERS": "1", "JOB_LEASE": "5s"}},
            "worker": {
                "autoscaling": {"mode": "none"},
                "env": {"WORKER_INFERENCE_THREADS": "1"},
            },
        },
    )
    secret = {
        "api-keys": f"ci:{KEYS['ci']}",
        "jobs-database-url": database,
    }
    played = Played(
        docs,
        for_podman(docs, api_pods=2, vault_token=False),
        secret,
        tmp_path_factory.mktemp("pods"),
    )
    try:
        played.wait_ready()
        yield played
    finally:
        played.down()


def container_names(pod: dict[str, Any]) -> list[str]:
    return [f"{pod['metadata']['name']}-{c['name']}" for c in pod["spec"]["containers"]]


def test_the_api_pods_serve_predictions_with_the_key_from_the_secret(chart_pods: Played) -> None:
    for pod in chart_pods.pods("api"):
        with api_client(chart_pods, pod["metadata"]["name"], "ci") as api:
            anonymous = httpx.post(api.base_url.join("/api/v1/predict"), json={"text": "Fine."})
            assert anonymous.status_code == 401
            liked = api.post(
                "/api/v1/predict", json={"text": "I love this movie, it was wonderful!"}
            )
            hated = api.post("/api/v1/predict", json={"text": "Dreadful, boring and far too long."})
            assert liked.json()["sentiment"]["label"] == "POSITIVE", liked.text
            assert hated.json()["sentiment"]["label"] == "NEGATIVE", hated.text


def test_the_probe_endpoints_answer_on_their_declared_ports(chart_pods: Played) -> None:
    """Each probe of the rendered Deployments, on the port it names, at each of their pods."""
    for deployment in (d for d in chart_pods.rendered if d["kind"] == "Deployment"):
        component = deployment["metadata"]["name"].rsplit("-", 1)[1]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for pod in chart_pods.pods(component):
            address = chart_pods.address(pod["metadata"]["name"])
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container[kind]["httpGet"]
                url = f"http://{address}:{ports.get(probe['port'], probe['port'])}{probe['path']}"
                assert httpx.get(url, timeout=5).status_code == 200, url


def test_the_pods_run_as_the_non_root_user_on_a_read_only_root(chart_pods: Played) -> None:
    for pod in (p for p in chart_pods.objects if p["kind"] == "Pod"):
        for name in container_names(pod):
            user, read_only = podman(
                "inspect", name, "--format", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}"
            ).split()
            assert read_only == "true", name
            assert podman("exec", name, "id", "-u").strip() == "1034", (name, user)
            written = subprocess.run(
                ["podman", "exec", name, "touch", "/home/bentoml/bento/written"],
                capture_output=True,
                text=True,
            )
            assert written.returncode != 0 and "Read-only file system" in written.stderr


def test_the_worker_finds_the_model_in_the_image_and_scores_and_dead_letters(
    chart_pods: Played, broker: TansuBroker
) -> None:
    (worker,) = chart_pods.pods("worker")
    linked = podman("exec", container_names(worker)[0], "ls", "/var/lib/bentoml/models/sentiment")
    assert linked.split(), "the init container linked no model version"
    good = [
        (
            f"k{i}".encode(),
            json.dumps({"id": f"m{i}", "text": f"A warm, lovely film ({i})."}).encode(),
        )
        for i in range(40)
    ]
    bad = [(b"bad-json", b"{not json"), (b"no-text", json.dumps({"id": "x"}).encode())]
    sent = asyncio.run(produce(broker.bootstrap, TOPICS[0], [*good, *bad]))
    items = asyncio.run(
        collect(broker.bootstrap, TOPICS[1:], lambda got: set(sent) <= set(sources(got)), 180)
    )
    assert sources(items) == {source: 1 for source in sent}  # each message once, none lost
    results = [i for i in items if i["_topic"] == TOPICS[1]]
    dead = [i for i in items if i["_topic"] == TOPICS[2]]
    assert len(results) == 40 and all(r["sentiment"]["label"] == "POSITIVE" for r in results)
    assert sorted(d["error"] for d in dead) == ["bad_json", "missing_text"]


def test_a_job_completes_on_postgresql_when_one_of_two_api_pods_is_killed(
    chart_pods: Played,
) -> None:
    first, second = (pod["metadata"]["name"] for pod in chart_pods.pods("api"))
    texts = [f"Review {i}: a fine, warm and lovely film." for i in range(4_000)]
    with api_client(chart_pods, first, "ci") as one, api_client(chart_pods, second, "ci") as two:
        job_id = one.post("/api/v1/batch/predict", json={"texts": texts}).json()["job_id"]

        def processed() -> int:
            return int(two.get(f"/api/v1/batch/status/{job_id}").json()["processed"])

        eventually(lambda: processed() > 0, "the job started")
        # SIGKILL to every container of the pod, which is then gone, as with a lost node: its
        # chunk in flight is lost, and it is not restarted to finish the job itself.
        podman("pod", "rm", "--force", "--time", "0", first)
        last: list[dict[str, Any]] = [{}]

        def completed() -> bool:
            """Asked on a new connection each time, and a slow answer is "not yet": podman
            rewires the bridge's firewall rules as the pod goes, which can stall a connection
            that was open across it."""
            try:
                status = httpx.get(
                    two.base_url.join(f"/api/v1/batch/status/{job_id}"),
                    headers=two.headers,
                    timeout=10,
                )
            except httpx.HTTPError as err:
                last.append({"error": repr(err)})
                return False
            last.append(status.json())
            return bool(last[-1].get("status") == "completed")

        try:
            eventually(completed, "the job completed on the pod left", 300)
        except AssertionError as err:
            logs = podman("logs", f"{second}-api", check=False)[-4000:]
            raise AssertionError(f"{err}: {last[-1]}\n{logs}") from None
    indices: list[int] = []
    offset: int | None = 0
    with api_client(chart_pods, second, "ci") as survivor:  # a connection opened after the kill
        while offset is not None:
            path = f"/api/v1/batch/results/{job_id}"
            page = survivor.get(path, params={"offset": offset}).json()
            indices += [item["index"] for item in page["results"]]
            offset = page["next_offset"]
    assert indices == list(range(len(texts)))


def test_the_api_pod_reads_its_keys_from_openbao(
    onnx_image: str, host: str, database: str, tmp_path: Path
) -> None:
    vault = OpenBao(VAULT_PORT, host=host)
    try:
        vault.put("kubesentiment/api-keys", vaulted=KEYS["vaulted"])
        docs = render(
            onnx_image,
            {
                "secrets": {"source": "vault", "vault": {"addr": vault.url}},
                "jobsDatabase": {
                    "type": "postgresql",
                    "postgresql": {"existingSecret": secret_of("vaulted")},
                },
                "api": {"env": {"SERVICE_WORKERS": "1"}},
                "worker": {"enabled": False},
            },
            release="vaulted",  # beside the module's pods, which are still up
        )
        secret = {"jobs-database-url": database, "vault-token": OpenBao.ROOT_TOKEN}
        played = Played(docs, for_podman(docs, api_pods=1, vault_token=True), secret, tmp_path)
        try:
            played.wait_ready()
            (pod,) = played.pods("api")
            name = pod["metadata"]["name"]
            with api_client(played, name, "vaulted") as api:
                answer = api.post("/api/v1/predict", json={"text": "Wonderful, I loved it."})
                assert (
                    answer.status_code == 200 and answer.json()["sentiment"]["label"] == "POSITIVE"
                )
                api.headers["Authorization"] = f"Bearer {KEYS['ci']}"  # not in Vault
                assert api.post("/api/v1/predict", json={"text": "Fine."}).status_code == 403
        finally:
            played.down()
    finally:
        vault.stop()
