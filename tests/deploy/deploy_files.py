"""Readers for the files in deploy/, shared by the deployment tests.

Everything here is offline: YAML is parsed with PyYAML, the Dask operator's CRDs come from
the installed dask-kubernetes package, and the Dask Helm chart's layout (which is not
installed anywhere) is written down below from the chart's values.yaml and templates.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
HELM = DEPLOY / "helm"
COMPOSE_FILES = (DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml")
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
ENTRYPOINT = DEPLOY / "entrypoint.sh"
OPERATOR_GROUP = "kubernetes.dask.org"


# -- YAML ---------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    """All YAML documents of a file (empty ones dropped)."""
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def kubernetes_files() -> list[Path]:
    return sorted(KUBERNETES.glob("*.yaml")) + [HELM / "job.yaml", HELM / "networkpolicy.yaml"]


@cache
def kubernetes_resources() -> tuple[tuple[Path, dict], ...]:
    """Every Kubernetes resource in deploy/kubernetes and deploy/helm/job.yaml."""
    return tuple((path, doc) for path in kubernetes_files() for doc in load_documents(path))


def resources_of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in kubernetes_resources() if doc.get("kind") == kind]


def helm_values() -> dict:
    (values,) = load_documents(HELM / "values.yaml")
    return values


def compose(path: Path = COMPOSE_FILES[0]) -> dict:
    (doc,) = load_documents(path)
    return doc


# -- the operator's CRDs ------------------------------------------------------------------


def crd_directory() -> Path:
    """The operator's CRDs with their schemas expanded, as shipped inside dask-kubernetes."""
    spec = importlib.util.find_spec("dask_kubernetes")
    assert spec is not None and spec.origin, "dask-kubernetes is not installed (it is in the dev extra)"
    return Path(spec.origin).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """``(kind, version) -> openAPIV3Schema`` of every operator CRD."""
    schemas = {}
    for path in sorted(crd_directory().glob("*.yaml")):
        for crd in load_documents(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            assert crd["spec"]["group"] == OPERATOR_GROUP
            for version in crd["spec"]["versions"]:
                schemas[(crd["spec"]["names"]["kind"], version["name"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def schema_for(resource: dict) -> dict:
    group, _, version = resource["apiVersion"].partition("/")
    assert group == OPERATOR_GROUP, resource["apiVersion"]
    return crd_schemas()[(resource["kind"], version)]


def pod_spec_schema(*, operator: bool = True) -> dict:
    """The PodSpec schema as embedded in the DaskJob CRD (``spec.job.spec``).

    The CRD renders Kubernetes' IntOrString fields (probe ports, targetPort) as
    ``{type: string, format: int-or-string}``, so inside operator resources they must be
    strings (a port name such as ``http-dashboard``). With ``operator=False`` they accept
    integers too, as in plain Kubernetes objects (a batch Job, the Helm chart's Deployments).
    """
    job = crd_schemas()[("DaskJob", "v1")]
    schema = job["properties"]["spec"]["properties"]["job"]["properties"]["spec"]
    return schema if operator else _int_or_string(schema)


def _int_or_string(schema: Any) -> Any:
    if isinstance(schema, dict):
        if schema.get("format") == "int-or-string":
            return {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        return {k: _int_or_string(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_int_or_string(v) for v in schema]
    return schema


def unknown_fields(instance: Any, schema: dict, path: str = "") -> list[str]:
    """Fields that Kubernetes would prune as unknown (a structural schema names every field).

    jsonschema accepts extra keys unless ``additionalProperties: false``; the API server
    instead drops them silently (or rejects them with ``--validate=strict``), so a typo such
    as ``replica:`` would vanish. This walks the instance along ``properties``, ``items`` and
    ``additionalProperties`` and reports every key the schema does not know.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(instance, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                found += unknown_fields(value, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, where)
            elif props is not None or extra is False:
                found.append(where)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


# -- pods and containers --------------------------------------------------------------------


def pod_specs() -> Iterator[tuple[str, dict]]:
    """``(where, PodSpec)`` of every pod the manifests describe (operator resources and the Job).

    ``where`` starts with the file name and names the kind and role of the pod.
    """
    for path, doc in kubernetes_resources():
        name = f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}"
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "DaskCluster":
            yield f"{name} scheduler", spec["scheduler"]["spec"]
            yield f"{name} worker", spec["worker"]["spec"]
        elif kind == "DaskWorkerGroup":
            yield f"{name} worker", spec["worker"]["spec"]
        elif kind == "DaskJob":
            yield f"{name} runner", spec["job"]["spec"]
            yield f"{name} scheduler", spec["cluster"]["spec"]["scheduler"]["spec"]
            yield f"{name} worker", spec["cluster"]["spec"]["worker"]["spec"]
        elif kind == "Job":
            yield name, spec["template"]["spec"]
        elif kind == "Pod":
            yield name, spec


def containers() -> Iterator[tuple[str, dict, dict]]:
    """``(where, container, pod spec)`` of every container in the manifests."""
    for where, pod in pod_specs():
        for container in pod.get("containers", []):
            yield f"{where} container {container['name']}", container, pod


def gpu_limit(resources: dict | None) -> int:
    return int((resources or {}).get("limits", {}).get("nvidia.com/gpu", 0))


# -- the Dask Helm chart ---------------------------------------------------------------------

# The layout of the dask/dask chart's values (https://github.com/dask/helm-chart, dask/values.yaml),
# as far as this project uses it. ``FREE`` marks values passed to Kubernetes as they are
# (resources, mounts, env, probes, ...), whose inner keys the chart does not read.
FREE = "free-form"
HELM_LAYOUT: dict[str, Any] = {
    "nameOverride": str,
    "fullnameOverride": str,
    "scheduler": {
        "name": str,
        "enabled": bool,
        "image": {"repository": str, "tag": str, "pullPolicy": str, "pullSecrets": FREE},
        "replicas": int,
        "serviceType": str,
        "loadBalancerIP": FREE,
        "servicePort": int,
        "serviceAnnotations": FREE,
        "extraArgs": list,
        "resources": FREE,
        "tolerations": FREE,
        "affinity": FREE,
        "nodeSelector": FREE,
        "securityContext": FREE,
        "serviceAccountName": str,
        "metrics": FREE,
        "livenessProbe": FREE,
        "readinessProbe": FREE,
        "env": FREE,
    },
    "webUI": FREE,
    "worker": {
        "name": str,
        "image": {"repository": str, "tag": str, "pullPolicy": str, "dask_worker": str, "pullSecrets": FREE},
        "replicas": int,
        "strategy": FREE,
        "custom_scheduler_url": FREE,
        "default_resources": FREE,
        "env": FREE,
        "extraArgs": list,
        "resources": FREE,
        "mounts": {"volumes": FREE, "volumeMounts": FREE},
        "annotations": FREE,
        "tolerations": FREE,
        "affinity": FREE,
        "nodeSelector": FREE,
        "securityContext": FREE,
        "serviceAccountName": str,
        "port": FREE,
        "portDashboard": int,
        "threads_per_worker": int,
        "metrics": FREE,
        "livenessProbe": FREE,
        "readinessProbe": FREE,
    },
    "additional_worker_groups": list,  # each item: the keys of "worker"
    "jupyter": FREE,
}
HELM_SCHEDULER_PORT = 8786
HELM_WORKER_DASHBOARD_PORT = 8790


def helm_key_problems(values: Any, layout: Any, path: str = "") -> list[str]:
    """Keys of ``values`` that the chart's layout does not have, or values of the wrong type."""
    if layout is FREE:
        return []
    if isinstance(layout, dict):
        if not isinstance(values, dict):
            return [f"{path} must be a mapping"]
        problems = []
        for key, value in values.items():
            where = f"{path}.{key}" if path else key
            if key not in layout:
                problems.append(f"{where} is not a value of the dask/dask chart")
            else:
                problems += helm_key_problems(value, layout[key], where)
        return problems
    if layout is int and isinstance(values, bool):
        return [f"{path} must be {layout.__name__}"]
    return [] if isinstance(values, layout) else [f"{path} must be {layout.__name__}"]


def helm_worker_groups(values: dict) -> list[dict]:
    """The main worker and each additional group merged over it (the chart's ``merge . worker``)."""
    base = values["worker"]
    return [base] + [_merge(group, base) for group in values.get("additional_worker_groups", [])]


def _merge(top: Any, base: Any) -> Any:
    if isinstance(top, dict) and isinstance(base, dict):
        merged = dict(base)
        for key, value in top.items():
            merged[key] = _merge(value, base.get(key))
        return merged
    return top


def helm_commands(values: dict) -> list[tuple[str, list[str]]]:
    """The container args the chart's templates build from ``values`` (dask/templates/*.yaml)."""
    scheduler = values.get("scheduler", {})
    port = scheduler.get("servicePort", HELM_SCHEDULER_PORT)
    commands = [
        (
            "helm scheduler",
            ["dask-scheduler", f"--port={port}", "--dashboard-address=:8787", *scheduler.get("extraArgs", [])],
        )
    ]
    for group in helm_worker_groups(values):
        address = group.get("custom_scheduler_url") or f"dask-scheduler:{port}"
        args = [group["image"].get("dask_worker", "dask-worker"), address]
        limits = group.get("resources", {}).get("limits")
        if limits:
            args += [
                "--nthreads",
                str(group.get("threads_per_worker") or limits.get("cpu") or 1),
                "--memory-limit",
                str(limits.get("memory") or "4GiB"),
            ]
        args += ["--no-dashboard", "--dashboard-address", str(group.get("portDashboard", HELM_WORKER_DASHBOARD_PORT))]
        if group.get("port"):
            args += ["--worker-port", str(group["port"])]
        args += [str(a) for a in group.get("extraArgs", [])]
        commands.append((f"helm worker group {group.get('name', 'worker')}", args))
    return commands


# -- Dockerfiles ------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def dockerfile_args(path: Path) -> dict[str, str]:
    """Default values of the ``ARG``s of a Dockerfile."""
    args = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def dockerfile_exec_form(path: Path, keyword: str) -> list[str]:
    """The JSON (exec) form of the last ENTRYPOINT or CMD."""
    import json

    (rest,) = [r for k, r in dockerfile_instructions(path) if k == keyword][-1:]
    value = json.loads(rest)
    assert isinstance(value, list), f"{path.name}: {keyword} must use the exec form"
    return value


def dockerfile_copies(path: Path) -> dict[str, str]:
    """``destination -> source`` of the single-source COPY instructions."""
    copies = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            if len(parts) == 2:
                copies[parts[1]] = parts[0]
    return copies


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ENV":
            for item in shlex.split(rest):
                if "=" in item:
                    name, _, value = item.partition("=")
                    env[name] = value
    return env


IMAGE = re.compile(r"^dask-influence:(?P<version>[0-9][^-]*)(?P<cuda>-cuda)?$")


# -- TLS and NetworkPolicy ----------------------------------------------------------------------

TLS_SECRET = "dask-influence-tls"
HELM_RELEASE = "dask"


def model_problems(instance: Any, type_name: str, path: str = "") -> list[str]:
    """Fields of ``instance`` that the Kubernetes API type ``type_name`` (e.g. ``V1NetworkPolicy``)
    does not have, and values of the wrong shape, read from the models of the installed
    ``kubernetes`` client (the API's OpenAPI types)."""
    import kubernetes.client.models as models

    inner = re.fullmatch(r"(?i)list\[(.+)\]", type_name)
    if inner:
        if not isinstance(instance, list):
            return [f"{path} must be a list"]
        return [p for i, item in enumerate(instance) for p in model_problems(item, inner[1], f"{path}[{i}]")]
    if re.fullmatch(r"(?i)dict\((.+)\)|dict\[(.+)\]", type_name):
        return [] if isinstance(instance, dict) else [f"{path} must be a mapping"]
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": (int, str, dict, list)}
    if type_name in scalars:
        ok = isinstance(instance, scalars[type_name]) and not (type_name == "int" and isinstance(instance, bool))
        return [] if ok else [f"{path} must be {type_name}"]
    model = getattr(models, type_name)
    if not isinstance(instance, dict):
        return [f"{path} must be a mapping ({type_name})"]
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    problems = []
    for key, value in instance.items():
        where = f"{path}.{key}" if path else key
        if key not in by_key:
            problems.append(f"{where} is not a field of {type_name}")
        else:
            problems += model_problems(value, model.openapi_types[by_key[key]], where)
    return problems


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def pods_with_labels() -> list[tuple[str, dict[str, str], dict]]:
    """``(where, labels, pod spec)`` of every pod the manifests make, with the labels the Dask
    operator adds (``dask.org/cluster-name``, ``dask.org/component``) and those of the Dask Helm
    chart's own pods (its scheduler and worker groups: ``app``, ``release``, ``component``)."""
    found = []
    for path, doc in kubernetes_resources():
        kind, spec, meta = doc["kind"], doc.get("spec", {}), doc["metadata"]
        name, own = f"{path.relative_to(ROOT)}:{kind}/{meta['name']}", dict(meta.get("labels", {}))

        def dask(cluster: str, component: str, base: dict = own) -> dict[str, str]:
            return base | {"dask.org/cluster-name": cluster, "dask.org/component": component}

        if kind == "DaskCluster":
            found.append((f"{name} scheduler", dask(meta["name"], "scheduler"), spec["scheduler"]["spec"]))
            found.append((f"{name} worker", dask(meta["name"], "worker"), spec["worker"]["spec"]))
        elif kind == "DaskWorkerGroup":
            found.append((f"{name} worker", dask(spec["cluster"], "worker"), spec["worker"]["spec"]))
        elif kind == "DaskJob":
            found.append((f"{name} runner", dask(meta["name"], "job-runner"), spec["job"]["spec"]))
            cluster = spec["cluster"]["spec"]
            found.append((f"{name} scheduler", dask(meta["name"], "scheduler"), cluster["scheduler"]["spec"]))
            found.append((f"{name} worker", dask(meta["name"], "worker"), cluster["worker"]["spec"]))
        elif kind == "Job":
            template = spec["template"]
            found.append((name, dict(template.get("metadata", {}).get("labels", {})), template["spec"]))
        elif kind == "Pod":
            found.append((name, own, spec))
    chart = {"app": "dask", "release": HELM_RELEASE}
    found.append(("helm scheduler", chart | {"component": "scheduler"}, {}))
    found.append(("helm worker", chart | {"component": "worker"}, {}))
    return found


def admitted(policies: list[dict], labels: dict[str, str], peer: dict[str, str], port: int) -> bool:
    """Whether a pod of this namespace labelled ``peer`` may open ``port`` on a pod labelled
    ``labels`` (NetworkPolicy semantics: a pod no policy selects admits everything; a selected
    one admits what any rule of any selecting policy allows)."""
    selecting = [p for p in policies if selector_matches(p["spec"]["podSelector"], labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            peers = rule.get("from")
            if ports and port not in ports:
                continue
            if peers is None or any("podSelector" in f and selector_matches(f["podSelector"], peer) for f in peers):
                return True
    return False
