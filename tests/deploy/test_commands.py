"""The commands in compose, the Kubernetes manifests, the Helm values and the Dockerfiles agree
with the CLIs: each one goes through the image's real entrypoint script (with stand-ins for
the executables that record what they were called with), and the resulting command must
exist (``--help`` runs), use only options its help lists, and parse."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest

from deploy_files import (
    COMPOSE_FILES,
    DEPLOY,
    DOCKERFILES,
    ENTRYPOINT,
    compose,
    containers,
    dockerfile_env,
    dockerfile_exec_form,
    helm_commands,
    helm_values,
)

EXECUTABLES = ("dask", "dask-influence", "dask-influence-make-certs")
MAKE_CERTS = DEPLOY / "make_certs.py"  # installed in the images as dask-influence-make-certs
UTILITIES = ("sleep",)  # a container that only waits (deploy/kubernetes/shell-pod.yaml)
DASK_SUBCOMMANDS = ("scheduler", "worker")


# -- every command line in the deployment files ---------------------------------------------


def _container_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for path in COMPOSE_FILES:
        for name, service in compose(path)["services"].items():
            if "command" in service:
                commands.append((f"{path.name} service {name}", [str(a) for a in service["command"]]))
    for where, container, _ in containers():
        argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
        if argv[0] not in UTILITIES:
            commands.append((where, argv))
    commands += helm_commands(helm_values())
    for path in DOCKERFILES:
        commands.append((f"{path.name} CMD", dockerfile_exec_form(path, "CMD")))
    # the entrypoint's own shortcuts, as docs/deploy.md shows them
    commands += [
        ("entrypoint scheduler", ["scheduler"]),
        (
            "entrypoint worker",
            ["worker", "tls://scheduler:8786", "--nthreads", "1", "--tls-ca-file", "/tls/ca.pem"]
            + ["--tls-cert", "/tls/worker.pem", "--tls-key", "/tls/worker-key.pem"],
        ),
        ("entrypoint job", ["job"]),
        ("entrypoint job with arguments", ["job", "/job/job.toml", "--resume", "--quiet"]),
        ("entrypoint passthrough", ["dask-influence", "inspect", "/data/influences.zarr"]),
    ]
    return commands


COMMANDS = _container_commands()


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    """A bin directory whose ``dask`` and ``dask-influence`` record their argv and exit."""
    bin_dir = tmp_path_factory.mktemp("stub-bin")
    for name in EXECUTABLES:
        stub = bin_dir / name
        stub.write_text('#!/bin/sh\nprintf \'%s\\0\' "$(basename "$0")" "$@" > "$ARGV_RECORD"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def through_entrypoint(argv: list[str], stubs: Path, tmp_path: Path) -> list[str]:
    """What the container runs for ``argv`` (its CMD or args), per deploy/entrypoint.sh."""
    record = tmp_path / "argv"
    record.unlink(missing_ok=True)
    env = {
        "PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "ARGV_RECORD": str(record),
        **dockerfile_env(DOCKERFILES[0]),
    }
    result = subprocess.run(["sh", str(ENTRYPOINT), *argv], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert record.exists(), f"the entrypoint ran none of {EXECUTABLES} for {argv}"
    return record.read_text().split("\0")[:-1]


# -- the CLIs, for real ---------------------------------------------------------------------------


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


# the (executable, subcommand) pairs the deployment files use; their --help runs are started
# together, since each one spends seconds importing dask (and torch)
EXPECTED_HELP = (
    ("dask", "scheduler"),
    ("dask", "worker"),
    ("dask-influence", None),
    ("dask-influence", "run"),
    ("dask-influence", "inspect"),
)
_HELP: dict[tuple[str, str | None], tuple[int, str, str]] = {}


def _help_argv(executable: str, subcommand: str | None) -> list[str]:
    if executable == "dask-influence-make-certs":
        return [sys.executable, str(MAKE_CERTS), "--help"]
    return [_executable(executable)] + ([subcommand] if subcommand else []) + ["--help"]


def _run_help(keys) -> None:
    running = {
        key: subprocess.Popen(_help_argv(*key), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key in keys
    }
    for key, process in running.items():
        out, err = process.communicate(timeout=180)
        _HELP[key] = (process.returncode, out, err)


def help_text(executable: str, subcommand: str | None) -> str:
    """``<executable> [<subcommand>] --help`` from the installed CLI; it must succeed."""
    key = (executable, subcommand)
    if key not in _HELP:
        _run_help(EXPECTED_HELP if not _HELP else [key])
    if key not in _HELP:
        _run_help([key])
    returncode, out, err = _HELP[key]
    assert returncode == 0, f"{' '.join(_help_argv(*key)[1:])} failed:\n{err}"
    return out


def click_command(executable: str, subcommand: str | None) -> click.Command:
    if executable == "dask":
        from distributed.cli import dask_scheduler, dask_worker

        return {"scheduler": dask_scheduler.main, "worker": dask_worker.main}[subcommand]
    from dask_influence.cli.main import cli

    if subcommand is None:
        return cli
    command = cli.commands.get(subcommand)
    assert command is not None, f"dask-influence has no subcommand {subcommand!r}; it has {sorted(cli.commands)}"
    return command


def split(argv: list[str]) -> tuple[str, str | None, list[str]]:
    executable = argv[0]
    assert executable in EXECUTABLES, f"the image runs {executable!r}, not one of {EXECUTABLES}"
    rest = argv[1:]
    if executable == "dask-influence-make-certs":
        return executable, None, rest
    if executable == "dask" or (rest and not rest[0].startswith("-")):
        assert rest, f"{executable} needs a subcommand"
        return executable, rest[0], rest[1:]
    return executable, None, rest


def options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-")]


# -- the tests ------------------------------------------------------------------------------------


def test_entrypoint_is_a_posix_shell_script_with_every_mode():
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "deploy/entrypoint.sh must be executable"
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)
    for mode in ("scheduler", "worker", "job", "dask-scheduler", "dask-worker"):
        assert re.search(rf"^\s*(\w[\w-]* \| )?{mode}( \| [\w-]+)*\)", text, re.M), mode
    execs = set(re.findall(r"^\s*exec (\S+(?: [a-z]+)?)", text, re.M))
    assert {"dask scheduler", "dask worker", "dask-influence run"} <= execs


def test_every_deployment_file_contributes_commands():
    sources = {where.split(" ")[0].split(":")[0] for where, _ in COMMANDS}
    assert {"compose.yaml", "compose.gpu.yaml", "helm", "Dockerfile", "Dockerfile.cuda", "entrypoint"} <= sources
    assert any("kubernetes/daskjob.yaml" in s for s in sources)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> Path:
    """The certificate files of the deployments (the `certs` volume, the Secret at /tls), made by
    deploy/make_certs.py as the `certs` service makes them."""
    directory = tmp_path_factory.mktemp("tls")
    done = subprocess.run([sys.executable, str(MAKE_CERTS), str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return directory


def tls_stand_in(arg: str, tls_files: Path) -> str:
    """``/tls/NAME`` -> the file NAME that deploy/make_certs.py wrote (it must have written it)."""
    if not arg.startswith("/tls/"):
        return arg
    local = tls_files / arg.removeprefix("/tls/")
    assert local.is_file(), f"{arg} is not one of the files deploy/make_certs.py writes"
    return str(local)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_exists_and_parses(where, argv, stubs, tmp_path, tls_files):
    final = through_entrypoint(argv, stubs, tmp_path)
    executable, subcommand, args = split(final)
    if args == ["--help"]:  # the image's default CMD prints the help
        help_text(executable, subcommand)
        return
    text = help_text(executable, subcommand)
    for option in options(args):
        assert re.search(rf"(^|[\s,/]){re.escape(option)}([\s,=]|$)", text, re.M), (
            f"{where}: {' '.join(final)}: {option} is not an option of "
            f"{executable}{' ' + subcommand if subcommand else ''}"
        )
    if executable == "dask-influence-make-certs":  # argparse, not click
        import importlib.util

        spec = importlib.util.spec_from_file_location("deploy_make_certs", MAKE_CERTS)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().parse_args(args)
        return
    command = click_command(executable, subcommand)
    args = [tls_stand_in(a, tls_files) for a in args]  # `dask` checks that its --tls-* files exist
    ctx = command.make_context(f"{executable} {subcommand or ''}".strip(), list(args), resilient_parsing=False)
    if "--memory-limit" in args:
        from dask.utils import parse_bytes

        parse_bytes(args[args.index("--memory-limit") + 1])
    if (executable, subcommand) == ("dask-influence", "run"):
        assert ctx.params["resume"], f"{where}: a job that may be restarted must pass --resume"


def test_workers_and_jobs_reach_the_scheduler_they_are_deployed_with(stubs, tmp_path):
    """compose: the tls:// address names the scheduler service and its --port; Helm: the chart's Service."""
    services = compose()["services"]
    scheduler = services["scheduler"]["command"]
    port = scheduler[scheduler.index("--port") + 1]
    for name, service in services.items():
        command = service["command"]
        if command[:2] == ["dask", "worker"]:
            assert command[2] == f"tls://scheduler:{port}", name
        if command[:2] == ["dask-influence", "run"]:
            assert command[command.index("--scheduler") + 1] == f"tls://scheduler:{port}", name
    for where, argv in helm_commands(helm_values()):
        if "worker" in where:
            assert argv[1] == f"tls://dask-scheduler:{helm_values()['scheduler']['servicePort']}"


def test_job_files_named_in_commands_are_mounted_where_the_command_looks():
    for name, service in compose()["services"].items():
        if service["command"][:2] == ["dask-influence", "run"]:
            targets = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
            source = targets[service["command"][2]]
            assert (DEPLOY / source).is_file(), f"{name} mounts {source} as its job file"
    for where, container, pod in containers():
        argv = container.get("command", []) + container.get("args", [])
        if argv[:2] != ["dask-influence", "run"]:
            continue
        job_file = Path(argv[2])
        mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == job_file.parent)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        paths = [item["path"] for item in volume["configMap"]["items"]]
        assert job_file.name in paths, f"{where}: {job_file} is not in the mounted ConfigMap"
        assert "batch_job/factory.py" in paths, f"{where}: the factory the job file names"
