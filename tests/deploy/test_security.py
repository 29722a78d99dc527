"""The deployments are closed by default: compose publishes the scheduler and the dashboard on
127.0.0.1 only; every Dask process in compose, the Kubernetes manifests and the Helm values
speaks TLS with the certificates of its role (a volume made by the one-shot `certs` service,
or the Secret dask-influence-tls); NetworkPolicies admit only workers and job clients to the
scheduler's port 8786 and nothing from outside the namespace to the dashboards. All offline."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from deploy_files import (
    COMPOSE_FILES,
    DEPLOY,
    DOCKERFILES,
    HELM,
    TLS_SECRET,
    admitted,
    compose,
    containers,
    dockerfile_copies,
    helm_commands,
    helm_values,
    helm_worker_groups,
    load_documents,
    model_problems,
    pods_with_labels,
    resources_of_kind,
)

MAKE_CERTS = DEPLOY / "make_certs.py"
TLS_FILES = ["--tls-ca-file", "--tls-cert", "--tls-key"]


def _make_certs_module():
    spec = importlib.util.spec_from_file_location("deploy_make_certs_for_tests", MAKE_CERTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def role_of(argv: list[str]) -> str | None:
    """``scheduler``, ``worker`` or ``client`` for a Dask or dask-influence command line."""
    argv = [str(a) for a in argv]
    if argv[:2] in (["dask", "scheduler"], ["dask-scheduler"]) or argv[:1] == ["dask-scheduler"]:
        return "scheduler"
    if argv[:2] == ["dask", "worker"] or argv[:1] == ["dask-worker"]:
        return "worker"
    if argv[:1] == ["dask-influence"] and len(argv) > 1 and argv[1] in ("run", "index", "query", "evaluate"):
        return "client"
    return None


def assert_tls_command(where: str, argv: list[str], role: str) -> None:
    """The command uses the CA and its own role's pair under /tls, and a tls:// address."""
    argv = [str(a) for a in argv]
    files = {opt: argv[argv.index(opt) + 1] for opt in TLS_FILES if opt in argv}
    assert files == {
        "--tls-ca-file": "/tls/ca.pem",
        "--tls-cert": f"/tls/{role}.pem",
        "--tls-key": f"/tls/{role}-key.pem",
    }, f"{where}: {' '.join(argv)}"
    if role == "scheduler":
        assert argv[argv.index("--protocol") + 1] == "tls", where
    elif role == "worker":
        address = next(a for a in argv[1:] if "://" in a or a.endswith(":8786"))
        assert address.startswith("tls://"), f"{where}: the worker connects to {address}"
    else:
        assert argv[argv.index("--scheduler") + 1].startswith("tls://"), where


# -- compose ---------------------------------------------------------------------------------


def test_compose_publishes_the_scheduler_and_dashboard_on_the_loopback_only():
    published = []
    for path in COMPOSE_FILES:
        for name, service in compose(path)["services"].items():
            for port in service.get("ports", []):
                published.append((path.name, name, str(port)))
                assert str(port).startswith("127.0.0.1:"), f"{path.name} {name} publishes {port} on every interface"
    assert {p for _, _, p in published} == {"127.0.0.1:8786:8786", "127.0.0.1:8787:8787"}


def test_compose_runs_every_dask_process_with_tls_and_its_roles_certificates():
    for path in COMPOSE_FILES:
        for name, service in compose(path)["services"].items():
            role = role_of(service.get("command", []))
            if role:
                assert_tls_command(f"{path.name} {name}", service["command"], role)
    services = compose()["services"]
    assert {n for n, s in services.items() if role_of(s["command"])} == {"scheduler", "worker-1", "worker-2", "job"}


def test_compose_certs_service_makes_the_certificates_before_the_scheduler_starts():
    doc = compose()
    services = doc["services"]
    assert "tls" in doc["volumes"]
    certs = services["certs"]
    assert certs["command"] == ["dask-influence-make-certs", "/tls"]
    assert certs["volumes"] == ["tls:/tls"] and certs.get("restart") == "no"
    assert services["scheduler"]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    for name in ("scheduler", "worker-1", "worker-2", "job"):
        assert "tls:/tls:ro" in services[name]["volumes"], f"{name} mounts the certificates read-only"


def test_compose_own_certificates_override_mounts_deploy_certs_everywhere():
    (override,) = load_documents(DEPLOY / "compose.own-certs.yaml")
    base = compose()["services"]
    users = {name for name, s in base.items() if any(str(v).split(":")[1] == "/tls" for v in s.get("volumes", []))}
    assert set(override["services"]) == users
    for name in users:
        assert override["services"][name]["volumes"] == ["./certs:/tls:ro"], name
    # the check it runs names every file the commands use, and what make_certs.py writes
    check = " ".join(override["services"]["certs"]["command"])
    for name in _make_certs_module().FILES:
        assert f"'{name}'" in check
    rules = (DEPLOY / ".gitignore").read_text().split()
    assert "certs/*" in rules and "!certs/README.md" in rules, "keep the keys in deploy/certs/ out of git"


# -- Kubernetes and Helm -----------------------------------------------------------------------


def test_every_kubernetes_dask_process_uses_tls_and_mounts_its_roles_files_from_the_secret():
    seen = set()
    for where, container, pod in containers():
        argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
        role = role_of(argv)
        if role is None and "shell" not in where:
            continue
        role = role or "client"  # the shell pod runs jobs by hand (its comment shows the command)
        seen.add(role)
        if "shell" not in where:
            assert_tls_command(where, argv, role)
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tls"]
        assert mount.get("readOnly") is True, where
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        secret = volume["secret"]
        assert secret["secretName"] == TLS_SECRET, where
        assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 1000, where
        keys = sorted(item["key"] for item in secret["items"])
        assert keys == sorted(["ca.pem", f"{role}.pem", f"{role}-key.pem"]), f"{where}: only its own role's key"
        assert all(item["path"] == item["key"] for item in secret["items"]), where
    assert seen == {"scheduler", "worker", "client"}


def test_workers_of_the_operator_name_their_clusters_tls_service():
    clusters = {d["metadata"]["name"] for d in resources_of_kind("DaskCluster") + resources_of_kind("DaskJob")}
    for where, container, _ in containers():
        argv = [str(a) for a in container.get("args", [])]
        if role_of(argv) == "worker":
            address = argv[2]
            assert address.startswith("tls://") and address.endswith("-scheduler:8786"), where
            assert address.removeprefix("tls://").removesuffix("-scheduler:8786") in clusters, where


def test_helm_values_run_the_chart_with_tls():
    values = helm_values()
    commands = dict(helm_commands(values))
    scheduler = commands["helm scheduler"]
    assert scheduler[scheduler.index("--protocol") + 1] == "tls"
    # the chart mounts nothing into the scheduler: its files come from the Secret through Dask's config
    env = {e["name"]: e for e in values["scheduler"]["env"]}
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"]["value"] == "True"
    for variable, key in (
        ("DASK_DISTRIBUTED__COMM__TLS__CA_FILE", "ca.pem"),
        ("DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT", "scheduler.pem"),
        ("DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY", "scheduler-key.pem"),
    ):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": TLS_SECRET, "key": key}
    for group in helm_worker_groups(values):
        where = f"helm worker group {group.get('name', 'worker')}"
        assert_tls_command(where, commands[where], "worker")
        (mount,) = [m for m in group["mounts"]["volumeMounts"] if m["mountPath"] == "/tls"]
        (volume,) = [v for v in group["mounts"]["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == TLS_SECRET and mount["readOnly"] is True
        assert sorted(i["key"] for i in volume["secret"]["items"]) == ["ca.pem", "worker-key.pem", "worker.pem"]
        assert group["securityContext"]["fsGroup"] == 1000


def test_secret_keys_are_the_files_make_certs_writes():
    written = set(_make_certs_module().FILES)
    volumes = [v for _, _, pod in containers() for v in pod.get("volumes", []) if "secret" in v]
    volumes += [v for g in helm_worker_groups(helm_values()) for v in g["mounts"]["volumes"] if "secret" in v]
    used = {item["key"] for v in volumes for item in v["secret"]["items"]}
    used |= {e["valueFrom"]["secretKeyRef"]["key"] for e in helm_values()["scheduler"]["env"] if "valueFrom" in e}
    assert used == written


# -- NetworkPolicy -----------------------------------------------------------------------------


def _policies() -> list[dict]:
    return resources_of_kind("NetworkPolicy")


def test_network_policies_are_valid_kubernetes_objects():
    assert len(_policies()) == 4
    for policy in _policies():
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        assert model_problems(policy, "V1NetworkPolicy") == [], policy["metadata"]["name"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:  # pods of this namespace only: no namespaceSelector, no ipBlock
                assert set(peer) == {"podSelector"}, policy["metadata"]["name"]


def _operator_policies() -> list[dict]:
    return load_documents(DEPLOY / "kubernetes" / "networkpolicy.yaml")


def _helm_policies() -> list[dict]:
    return load_documents(HELM / "networkpolicy.yaml")


SCHEDULERS = [
    (where, labels)
    for where, labels, _ in pods_with_labels()
    if "scheduler" in (labels.get("dask.org/component"), labels.get("component"))
]


@pytest.mark.parametrize("where,labels", SCHEDULERS, ids=[w for w, _ in SCHEDULERS])
def test_scheduler_port_admits_only_its_workers_and_clients(where, labels):
    policies = _helm_policies() if where.startswith("helm") else _operator_policies()
    for peer_where, peer, _ in pods_with_labels():
        role = peer.get("dask.org/component") or peer.get("component")
        client = peer.get("dask-influence/scheduler-client") == "true"
        same_deployment = where.startswith("helm") == peer_where.startswith("helm")
        expected = (role in ("worker", "job-runner") and same_deployment) or client
        assert admitted(policies, labels, peer, 8786) == expected, f"{peer_where} -> {where}:8786"
    for stranger in ({}, {"app": "other"}, {"app.kubernetes.io/name": "dask-influence"}):
        assert not admitted(policies, labels, stranger, 8786), f"{stranger} -> {where}:8786"
        assert admitted(policies, labels, stranger, 8787), "the dashboard stays open to this namespace"
    assert not admitted(policies, labels, {"dask.org/component": "worker"}, 22), "no other port"


def test_workers_admit_the_scheduler_peers_and_clients_only():
    for where, labels, _ in pods_with_labels():
        if "worker" not in where:
            continue
        policies = _helm_policies() if where.startswith("helm") else _operator_policies()
        scheduler = (
            {"app": "dask", "release": "dask", "component": "scheduler"}
            if where.startswith("helm")
            else {"dask.org/component": "scheduler"}
        )
        assert admitted(policies, labels, scheduler, 40123), where
        assert admitted(policies, labels, labels, 40123), where
        assert admitted(policies, labels, {"dask-influence/scheduler-client": "true"}, 40123), where
        assert not admitted(policies, labels, {"app": "other"}, 40123), where


def test_every_client_pod_is_labelled_for_the_scheduler():
    for where, labels, pod in pods_with_labels():
        for container in pod.get("containers", []):
            argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
            if role_of(argv) == "client" and labels.get("dask.org/component") != "job-runner":
                assert labels.get("dask-influence/scheduler-client") == "true", where


# -- the images and make_certs.py ----------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_ship_make_certs_and_cryptography(path):
    assert dockerfile_copies(path)["/usr/local/bin/dask-influence-make-certs"] == "deploy/make_certs.py"
    text = path.read_text()
    assert " cryptography " in text and "/tls" in text
    assert "cryptography==" in (DEPLOY / "constraints.txt").read_text()


@pytest.mark.subprocess
def test_make_certs_keeps_a_complete_set_refuses_a_partial_one_and_replaces_on_force(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(MAKE_CERTS), *map(str, args)], capture_output=True, text=True)

    first = run(tmp_path / "tls")
    assert first.returncode == 0 and first.stdout.startswith("Wrote a new CA and certificates"), first.stderr
    files = {p.name: p.read_bytes() for p in (tmp_path / "tls").iterdir()}
    assert sorted(files) == sorted(_make_certs_module().FILES)
    assert ((tmp_path / "tls" / "client-key.pem").stat().st_mode & 0o777) == 0o600
    again = run(tmp_path / "tls")
    assert again.returncode == 0 and "kept them" in again.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "tls").iterdir()} == files
    (tmp_path / "tls" / "worker.pem").unlink()
    partial = run(tmp_path / "tls")
    assert partial.returncode == 1
    assert partial.stderr.startswith(f"Error: {tmp_path / 'tls'} holds only some of the certificate files (ca.pem, ")
    forced = run(tmp_path / "tls", "--force")
    assert forced.returncode == 0
    assert (tmp_path / "tls" / "ca.pem").read_bytes() != files["ca.pem"]
