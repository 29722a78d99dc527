"""The deployment files parse, validate against the Dask operator's own CRD schemas, and agree
with each other: images, volumes, the ConfigMap with the job files, GPU requests."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jsonschema
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from deploy_files import (
    COMPOSE_FILES,
    DEPLOY,
    DOCKERFILES,
    HELM_LAYOUT,
    IMAGE,
    ROOT,
    compose,
    containers,
    crd_schemas,
    dockerfile_args,
    dockerfile_copies,
    dockerfile_env,
    dockerfile_exec_form,
    gpu_limit,
    helm_key_problems,
    helm_values,
    helm_worker_groups,
    kubernetes_files,
    kubernetes_resources,
    load_documents,
    pod_spec_schema,
    pod_specs,
    resources_of_kind,
    schema_for,
    unknown_fields,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPERATOR_KINDS = ("DaskCluster", "DaskWorkerGroup", "DaskJob")
EXAMPLE_JOB = ROOT / "examples" / "batch_job"


def _version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["project"]["version"]


def _operator_resources() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in kubernetes_resources() if d.get("apiVersion", "").startswith("kubernetes.dask.org/")]


def _ids(items):
    return [f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in items]


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [*kubernetes_files(), DEPLOY / "helm" / "values.yaml", *COMPOSE_FILES],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_yaml_files_parse(path):
    docs = load_documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_every_kubernetes_resource_has_kind_and_name():
    kinds = {d["kind"] for _, d in kubernetes_resources()}
    assert {"DaskCluster", "DaskWorkerGroup", "DaskJob", "PersistentVolumeClaim", "ConfigMap", "Job"} <= kinds
    for path, doc in kubernetes_resources():
        assert doc.get("apiVersion") and doc.get("kind"), path
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, (path, name)


# -- operator resources against the operator's CRDs -----------------------------------------


def test_crds_ship_with_dask_kubernetes():
    assert {kind for kind, _ in crd_schemas()} >= set(OPERATOR_KINDS)


@pytest.mark.parametrize("item", _operator_resources(), ids=_ids(_operator_resources()))
def test_operator_resource_validates_against_its_crd(item):
    path, resource = item
    assert resource["kind"] in OPERATOR_KINDS
    schema = schema_for(resource)
    body = {k: v for k, v in resource.items() if k not in ("apiVersion", "kind", "metadata")}
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert unknown_fields(body, schema) == [], "fields the API server would drop as unknown"


def test_cluster_names_are_valid_for_the_operator():
    from dask_kubernetes.constants import VALID_CLUSTER_NAME

    for resource in resources_of_kind("DaskCluster") + resources_of_kind("DaskJob"):
        assert VALID_CLUSTER_NAME.match(resource["metadata"]["name"]), resource["metadata"]["name"]


def test_scheduler_services_select_their_own_cluster():
    clusters = [(d["metadata"]["name"], d["spec"]) for d in resources_of_kind("DaskCluster")]
    clusters += [(d["metadata"]["name"], d["spec"]["cluster"]["spec"]) for d in resources_of_kind("DaskJob")]
    for name, spec in clusters:
        service = spec["scheduler"]["service"]
        assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
        ports = {p["name"]: p for p in service["ports"]}
        assert ports["tcp-comm"]["port"] == 8786 and ports["http-dashboard"]["port"] == 8787
        container_ports = {p["name"] for c in spec["scheduler"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["ports"]} <= container_ports


def test_gpu_worker_group_belongs_to_the_cluster_and_requests_one_gpu():
    clusters = {d["metadata"]["name"] for d in resources_of_kind("DaskCluster")}
    groups = resources_of_kind("DaskWorkerGroup")
    assert groups
    for group in groups:
        assert group["spec"]["cluster"] in clusters
    gpu_groups = [
        g for g in groups if any(gpu_limit(c.get("resources")) for c in g["spec"]["worker"]["spec"]["containers"])
    ]
    assert gpu_groups, "a DaskWorkerGroup of GPU workers"
    cpu_cluster = resources_of_kind("DaskCluster")[0]["spec"]["worker"]["spec"]["containers"]
    assert not any(gpu_limit(c.get("resources")) for c in cpu_cluster), "the DaskCluster's own group is the CPU one"


def test_daskjob_runner_resumes_and_restarts_on_failure():
    jobs = resources_of_kind("DaskJob")
    assert jobs
    for job in jobs:
        pod = job["spec"]["job"]["spec"]
        assert pod["restartPolicy"] == "OnFailure"
        (runner,) = pod["containers"]
        args = runner.get("command", []) + runner.get("args", [])
        assert args[:2] == ["dask-influence", "run"] and "--resume" in args
        # the operator's DASK_SCHEDULER_ADDRESS is tcp://: the runner names the tls:// address of
        # the Service the operator makes for this job's cluster, <job name>-scheduler
        assert args[args.index("--scheduler") + 1] == f"tls://{job['metadata']['name']}-scheduler:8786"


# -- pods: volumes, images, GPUs --------------------------------------------------------------


def test_pod_specs_validate_against_the_pod_schema():
    for where, pod in pod_specs():
        schema = pod_spec_schema(operator=":Dask" in where)
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(pod))
        assert not errors, f"{where}: " + "; ".join(e.message for e in errors)
        assert unknown_fields(pod, schema) == [], where


def test_volumes_point_at_the_pvc_and_the_configmap():
    (pvc,) = resources_of_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "many workers on many nodes write to the store"
    assert pvc["spec"]["resources"]["requests"]["storage"]
    (configmap,) = resources_of_kind("ConfigMap")
    for where, pod in pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mount {mount['name']} has no volume"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], where
            if "configMap" in volume:
                assert volume["configMap"]["name"] == configmap["metadata"]["name"], where
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in configmap["data"], f"{where}: no key {item['key']}"


def test_store_volume_is_mounted_at_data_in_runners_and_workers():
    for where, container, pod in containers():
        if "scheduler" in where:
            continue
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert mounts.get("/data") in claims, f"{where}: the store volume at /data"
        assert "/job" in mounts, f"{where}: the job files at /job"


def test_images_match_the_package_version_and_gpu_pods_use_the_cuda_image():
    version = _version()
    for where, container, _ in containers():
        match = IMAGE.match(container["image"])
        assert match and match["version"] == version, f"{where}: {container['image']}"
        if gpu_limit(container.get("resources")):
            assert match["cuda"], f"{where} requests a GPU but runs {container['image']}"
            assert gpu_limit(container["resources"]) == 1
    for values_image in [helm_values()["scheduler"]["image"]] + [g["image"] for g in helm_worker_groups(helm_values())]:
        match = IMAGE.match(f"{values_image['repository']}:{values_image['tag']}")
        assert match and match["version"] == version, values_image


def test_gpu_workers_advertise_exactly_the_gpus_they_request():
    """A container asking for one GPU starts its worker with --resources GPU=1, and vice versa."""
    for where, container, _ in containers():
        args = container.get("command", []) + container.get("args", [])
        advertises = "--resources" in args and args[args.index("--resources") + 1] == "GPU=1"
        if args[:2] == ["dask", "worker"]:
            assert advertises == bool(gpu_limit(container.get("resources"))), where
    for group in helm_worker_groups(helm_values()):
        extra = [str(a) for a in group.get("extraArgs", [])]
        advertises = "--resources" in extra and extra[extra.index("--resources") + 1] == "GPU=1"
        assert advertises == bool(gpu_limit(group.get("resources"))), group.get("name")


# -- the job files and their ConfigMap ------------------------------------------------------------


def test_configmap_holds_the_deploy_job_files_and_the_example_factory():
    (configmap,) = resources_of_kind("ConfigMap")
    expected = {
        "job.toml": DEPLOY / "job.toml",
        "job-gpu.toml": DEPLOY / "job-gpu.toml",
        "factory.py": EXAMPLE_JOB / "factory.py",
    }
    assert set(configmap["data"]) == set(expected)
    for key, path in expected.items():
        assert configmap["data"][key] == path.read_text(), (
            f"deploy/kubernetes/configmap-job.yaml is out of date for {key}; regenerate it with the "
            "kubectl command in its header"
        )


@pytest.mark.parametrize("name", ["job.toml", "job-gpu.toml"])
def test_deploy_job_files_are_valid_and_mirror_the_example(name, tmp_path):
    from dask_influence.job import load_job

    # the layout the containers see: /job/<name> and /job/batch_job/factory.py
    (tmp_path / "batch_job").mkdir()
    (tmp_path / name).write_text((DEPLOY / name).read_text())
    job = load_job(tmp_path / name)
    example = load_job(EXAMPLE_JOB / "job.toml")
    assert job.model.factory == example.model.factory
    assert job.model.path == (str(tmp_path / "batch_job"),)
    assert job.solver == example.solver and job.blocks == example.blocks
    assert (job.output.mode, job.output.top_k, job.output.self_influences) == (
        example.output.mode,
        example.output.top_k,
        example.output.self_influences,
    )
    assert job.output.store.startswith("/data/"), "the store goes to the shared volume"
    assert job.cluster.scheduler is None, "the scheduler comes from --scheduler or DASK_SCHEDULER_ADDRESS"
    assert job.cluster.gpu == (name == "job-gpu.toml")


def test_daskjobs_run_the_job_file_that_matches_their_hardware():
    for job in resources_of_kind("DaskJob"):
        (runner,) = job["spec"]["job"]["spec"]["containers"]
        job_file = runner["args"][2]
        on_gpu = bool(gpu_limit(runner.get("resources")))
        assert job_file == ("/job/job-gpu.toml" if on_gpu else "/job/job.toml"), job["metadata"]["name"]
        workers = job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"]
        assert all(bool(gpu_limit(c.get("resources"))) == on_gpu for c in workers)


# -- Helm values ------------------------------------------------------------------------------


def test_helm_values_use_only_the_charts_keys():
    values = helm_values()
    assert helm_key_problems(values, HELM_LAYOUT) == []
    for group in values.get("additional_worker_groups", []):
        assert "name" in group
        assert helm_key_problems(group, HELM_LAYOUT["worker"], f"additional_worker_groups.{group['name']}") == []
    assert values["jupyter"]["enabled"] is False


def test_helm_pod_pieces_validate_against_the_pod_schema():
    pod = pod_spec_schema(operator=False)  # the chart makes Deployments, not operator resources
    container = pod["properties"]["containers"]["items"]
    volume = pod["properties"]["volumes"]["items"]
    mount = container["properties"]["volumeMounts"]["items"]
    checks = [
        (pod["properties"]["securityContext"], "securityContext", False),
        (pod["properties"]["tolerations"], "tolerations", False),
        (container["properties"]["resources"], "resources", False),
        (container["properties"]["env"], "env", False),
        (container["properties"]["readinessProbe"], "readinessProbe", False),
    ]
    values = helm_values()
    for group in [values["scheduler"], *helm_worker_groups(values)]:
        for schema, key, _ in checks:
            if key in group:
                jsonschema.validate(group[key], schema)
                assert unknown_fields(group[key], schema) == [], key
        for v in group.get("mounts", {}).get("volumes", []):
            jsonschema.validate(v, volume)
            assert unknown_fields(v, volume) == []
        for m in group.get("mounts", {}).get("volumeMounts", []):
            jsonschema.validate(m, mount)
    (configmap,) = resources_of_kind("ConfigMap")
    (pvc,) = resources_of_kind("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in values["worker"]["mounts"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert volumes["job"]["configMap"]["name"] == configmap["metadata"]["name"]


def test_helm_job_targets_the_charts_scheduler_service():
    (job,) = resources_of_kind("Job")
    (runner,) = job["spec"]["template"]["spec"]["containers"]
    args = runner["args"]
    port = helm_values()["scheduler"].get("servicePort", 8786)
    # release "dask" of chart "dask": the chart names the Service "<release>-scheduler"
    assert args[args.index("--scheduler") + 1] == f"tls://dask-scheduler:{port}"
    assert "--resume" in args


# -- compose ------------------------------------------------------------------------------------


def test_compose_has_a_scheduler_two_workers_and_a_job():
    services = compose()["services"]
    assert set(services) == {"certs", "scheduler", "worker-1", "worker-2", "job"}
    job = services["job"]
    assert set(job["depends_on"]) == {"scheduler", "worker-1", "worker-2"}
    assert job["command"][:3] == ["dask-influence", "run", "/job/job.toml"] and "--resume" in job["command"]
    for name in ("worker-1", "worker-2", "job"):
        service = services[name]
        targets = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert targets["/data"] in compose()["volumes"], f"{name}: /data is the shared named volume"
        assert targets["/job/job.toml"] == "./job.toml"
        assert (DEPLOY / targets["/job/batch_job"]).resolve() == EXAMPLE_JOB
    version = _version()
    for path in COMPOSE_FILES:
        for name, service in compose(path)["services"].items():
            match = IMAGE.match(service["image"])
            assert match and match["version"] == version, (path.name, name)
            dockerfile = DEPLOY.parent / service["build"]["dockerfile"]
            assert dockerfile.name == ("Dockerfile.cuda" if match["cuda"] else "Dockerfile")
            assert (DEPLOY / service["build"]["context"]).resolve() == ROOT


def test_compose_gpu_override_gives_workers_gpus():
    services = compose(COMPOSE_FILES[1])["services"]
    for name in ("worker-1", "worker-2"):
        command = services[name]["command"]
        assert command[command.index("--resources") + 1] == "GPU=1"
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "./job-gpu.toml:/job/job.toml:ro" in services["job"]["volumes"]


# -- Dockerfiles ------------------------------------------------------------------------------------


def test_both_images_pin_the_same_dask_and_torch():
    cpu, cuda = (dockerfile_args(p) for p in DOCKERFILES)
    assert cpu["DASK_VERSION"] == cuda["DASK_VERSION"]
    with (ROOT / "pyproject.toml").open("rb") as fh:
        deps = [Requirement(r) for r in tomllib.load(fh)["project"]["dependencies"]]
    for requirement in deps:
        if requirement.name in ("dask", "distributed"):
            assert Version(cpu["DASK_VERSION"]) in requirement.specifier
    base = re.fullmatch(
        r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn(?P<cudnn>\d+)-runtime", cuda["PYTORCH_IMAGE"]
    )
    assert base, f"an official PyTorch CUDA runtime image, got {cuda['PYTORCH_IMAGE']}"
    assert base["torch"] == cpu["TORCH_VERSION"], "the CPU and CUDA images must run the same torch"
    constraints = (DEPLOY / "constraints.txt").read_text()
    pinned = [Requirement(line).name for line in constraints.splitlines() if line.strip() and not line.startswith("#")]
    assert pinned and not {"dask", "distributed", "torch"} & set(pinned)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_entrypoint_and_the_package(path):
    entrypoint = dockerfile_exec_form(path, "ENTRYPOINT")
    copies = dockerfile_copies(path)
    assert copies.get(f"/usr/local/bin/{entrypoint[0]}") == "deploy/entrypoint.sh"
    assert copies.get("src") == "./src" or copies.get("./src") == "src"
    assert dockerfile_env(path)["DASK_INFLUENCE_JOB"] == "/job/job.toml"
    text = path.read_text()
    assert "-c deploy/constraints.txt" in text
    assert '"distributed==${DASK_VERSION}"' in text and '"dask[array,diagnostics]==${DASK_VERSION}"' in text
    ignore = path.with_name(path.name + ".dockerignore")
    assert ".venv" in ignore.read_text().split(), "keep the virtualenv out of the build context"
