"""The deployment files, checked offline against real schemas, real CLIs and each other.

There is no Docker engine and no cluster here, so:
- ``docker-compose.yml`` goes through Debian's ``docker-compose config`` (it validates without an
  engine) and ``check-jsonschema``'s compose-spec schema; the CPU override is merged the way
  Compose v2 merges it and the result goes through both again;
- the teacher service's own compose command and environment start a real teacher here, and the
  compose healthchecks are run against it and against a real Redis;
- the Dockerfiles go through BuildKit's parser (the ``dockerfile`` package) and ``sh -n``;
- ``deploy/k8s`` is rendered as kustomize does and every resource validated against the
  Kubernetes JSON schemas of ``kubernetes-validate`` (strict: unknown fields fail), the PyTorchJob
  against a schema written from the Kubeflow training-operator's CRD, its pod templates again
  against Kubernetes' PodTemplateSpec;
- every command in compose and Kubernetes is parsed by the real argument parser of the CLI it
  runs, and ports, names, volumes and settings are cross-checked between files.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from referencing import Registry, Resource
from testkit import REPO
from testkit.servers import RedisServer, free_port

from teacher_server.settings import ServerSettings, settings_from_args

COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DOCKER_DIR = REPO / "deploy" / "docker"
K8S_DIR = REPO / "deploy" / "k8s"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
# Documents that describe the compose stack; the README joins once it has its compose section.
COMPOSE_DOCS = [DEPLOY_DOC, REPO / "README.md"]
DEFAULTS = ServerSettings()
# Oldest Kubernetes we support (gRPC probes are GA from 1.27) and the newest the schemas know.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()))
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
READY_TIMEOUT_S = 120
GPU = {"driver": "nvidia", "capabilities": ["gpu"]}


# ---------------------------------------------------------------------------------------------
# docker compose


def clean_env() -> dict[str, str]:
    """An environment without the user's compose variables, so that every default applies."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def docker_compose() -> str:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed: `apt-get install docker-compose` (`make test` does)"
    return binary


def compose_config(*compose_files: Path) -> dict[str, Any]:
    """What ``docker-compose config`` makes of the files: validated, interpolated, merged."""
    command = [docker_compose(), "--project-directory", str(REPO)]
    for path in compose_files:
        command += ["-f", str(path)]
    result = subprocess.run(
        [*command, "config"], cwd=REPO, env=clean_env(), capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, f"docker-compose config rejected {compose_files}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


RESET = object()


class OverrideLoader(yaml.SafeLoader):
    """YAML loader that understands Compose v2's ``!reset`` tag (the attribute is removed)."""


OverrideLoader.add_constructor("!reset", lambda loader, node: RESET)


def merge_override(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Compose v2's merge for what an override of ours may contain.

    Mappings merge key by key, scalars replace, ``!reset`` removes. Sequences are refused: Compose
    v1 and v2 merge them differently (append, by key, replace), so an override must not rely on it.
    """
    merged = dict(base)
    for key, value in override.items():
        here = f"{where}.{key}" if where else key
        if value is RESET:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_override(merged[key], value, here)
        elif isinstance(value, list):
            raise AssertionError(f"{here}: an override must not merge sequences; use !reset or a mapping")
        else:
            merged[key] = value
    return merged


@cache
def compose() -> dict[str, Any]:
    return compose_config(COMPOSE)


@cache
def compose_cpu_raw() -> dict[str, Any]:
    base = yaml.safe_load(COMPOSE.read_text())
    override = yaml.load(COMPOSE_CPU.read_text(), Loader=OverrideLoader)  # a SafeLoader subclass: no arbitrary objects
    return merge_override(base, override)


def write_cpu_merged(directory: Path) -> Path:
    """docker-compose.yml with docker-compose.cpu.yml merged in, as a plain compose file."""
    path = directory / "docker-compose.cpu-merged.yml"
    path.write_text(yaml.safe_dump(compose_cpu_raw(), sort_keys=False))
    return path


@cache
def compose_cpu() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        return compose_config(write_cpu_merged(Path(directory)))


def service(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    return (config or compose())["services"][name]


def gpu_devices(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def compose_volumes(spec: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service in ``docker-compose config`` form."""
    mounts = {}
    for entry in spec.get("volumes", []):
        source, target, *mode = (
            entry.split(":")
            if isinstance(entry, str)
            else (entry["source"], entry["target"], "ro" if entry.get("read_only") else "rw")
        )
        mounts[target] = (source, mode == ["ro"])
    return mounts


def duration_s(text: str) -> float:
    """Compose durations: ``45s``, ``1m30s``, ``600s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a compose duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_config_accepts_the_file_and_defines_the_stack() -> None:
    config = compose()
    assert set(config["services"]) == {"redis", "teacher", "prewarm", "student"}
    assert set(config["volumes"]) == {"redis-data", "hf-cache", "checkpoints"}


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    # The validator must be able to fail: an unknown depends_on condition is not in the spec.
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["student"]["depends_on"]["teacher"]["condition"] = "service_started_eventually"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_compose_schema(path)
    assert result.returncode != 0
    assert "condition" in result.stdout + result.stderr


def test_compose_start_order_waits_for_healthy_dependencies() -> None:
    healthy = {"condition": "service_healthy"}
    assert service("teacher")["depends_on"] == {"redis": healthy}
    assert service("prewarm")["depends_on"] == {"redis": healthy, "teacher": healthy}
    assert service("student")["depends_on"] == {
        "redis": healthy,
        "teacher": healthy,
        "prewarm": {"condition": "service_completed_successfully"},
    }
    # Every service something waits on for health has a healthcheck.
    for name in ("redis", "teacher"):
        assert service(name)["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    assert service("prewarm")["restart"] == "no"  # a one-shot: "completed successfully" must be reachable


def test_compose_reserves_one_gpu_for_the_teacher_and_all_for_the_student() -> None:
    teacher, student = gpu_devices(service("teacher")), gpu_devices(service("student"))
    assert len(teacher) == 1 and teacher[0] == {**GPU, "count": 1}
    assert len(student) == 1 and student[0] == {**GPU, "count": "all"}
    assert not gpu_devices(service("redis")) and not gpu_devices(service("prewarm"))


def test_compose_teacher_ports_and_healthcheck_match_the_settings_defaults() -> None:
    teacher = service("teacher")
    args = parse_teacher_command(teacher["command"])
    settings = settings_from_args(args, env=teacher["environment"])
    assert (settings.grpc_port, settings.http_port) == (DEFAULTS.grpc_port, DEFAULTS.http_port)
    published = {int(port["target"]) for port in teacher["ports"]}
    assert published == {settings.grpc_port, settings.http_port}
    probe = " ".join(teacher["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.grpc_port}" in probe and "HealthStub" in probe
    # Compose's SIGKILL comes after stop_grace_period: the drain must be over by then.
    assert duration_s(teacher["stop_grace_period"]) > settings.drain_timeout_s + 5


def test_compose_teacher_environment_is_a_valid_settings_set() -> None:
    teacher = service("teacher")
    settings = settings_from_args(parse_teacher_command(teacher["command"]), env=teacher["environment"])
    redis = urlparse(settings.redis_url)
    assert redis.hostname == "redis" and redis.port == 6379  # the redis service, its default port
    assert settings.device == ("cuda:0",) and settings.model == "Salesforce/blip-itm-base-coco"
    assert teacher["environment"]["HF_HOME"] in compose_volumes(teacher)


def test_compose_student_and_prewarm_reach_the_teacher_service_on_its_grpc_port() -> None:
    for name in ("student", "prewarm"):
        args = parse_student_command(service(name)["command"])
        target = urlparse(args.teacher)
        assert (target.scheme, target.hostname, target.port) == ("grpc", "teacher", DEFAULTS.grpc_port), name


def test_compose_student_volumes_hold_data_checkpoints_and_the_hf_cache() -> None:
    student = service("student")
    mounts = compose_volumes(student)
    args = parse_student_command(student["command"])
    assert mounts["/data"][1], "the dataset is mounted read-only"
    assert mounts[args.output_dir] == ("checkpoints", False)
    assert mounts[student["environment"]["HF_HOME"]] == ("hf-cache", False)
    assert any(value.startswith("data.root=/data/") for value in args.overrides)
    assert "pretrained=/data/params/detr-r50-e632da11.pth" in args.overrides, "DETR weights from the data mount"
    assert args.resume == "auto", "a restarted container continues from its checkpoint"
    assert compose_volumes(service("prewarm"))["/data"][1]


def test_compose_cpu_override_drops_only_the_gpu_reservations(tmp_path: Path) -> None:
    cpu = compose_cpu()
    gpu = compose()
    for name in ("teacher", "student"):
        assert not gpu_devices(service(name, cpu)), f"{name} still reserves a GPU"
        assert service(name, cpu)["image"].endswith("-cpu")
    settings = ServerSettings.from_env(
        {k: v for k, v in service("teacher", cpu)["environment"].items() if k.startswith("HOIDISTILL_")}
    )
    assert settings.device == ("cpu",) and settings.dtype == "fp32"
    for name in gpu["services"]:  # nothing else changes: same commands, ports, volumes, start order
        for key in ("command", "ports", "volumes", "depends_on", "healthcheck"):
            assert service(name, cpu).get(key) == service(name).get(key), f"{name}.{key}"
    assert service("teacher", cpu)["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    result = check_compose_schema(write_cpu_merged(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_override_merge_refuses_sequences() -> None:
    with pytest.raises(AssertionError, match=re.escape("services.teacher.ports")):
        merge_override({"services": {"teacher": {"ports": ["1:1"]}}}, {"services": {"teacher": {"ports": ["2:2"]}}})


# ---------------------------------------------------------------------------------------------
# The compose stack's own commands, run here as processes (the CPU variant: no GPU here)


class TeacherProcess:
    """The compose teacher service's command and environment as a local process."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._pump, args=(self.process.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.errors.append), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, put: Any) -> None:
        for line in stream:
            put(line)
        put(None)

    def wait_ready(self) -> None:
        while True:
            line = self.lines.get(timeout=READY_TIMEOUT_S)
            if line is None:
                self.process.wait(timeout=30)
                raise AssertionError("teacher exited before it was ready:\n" + "".join(filter(None, self.errors)))
            if line.startswith("teacher ready"):
                return

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def compose_teacher(
    tiny_blip_dir: Path, private_redis: RedisServer, tmp_path: Path
) -> Iterator[tuple[int, TeacherProcess, str]]:
    """The CPU compose teacher, on free loopback ports, with the tiny model and a private Redis."""
    teacher = service("teacher", compose_cpu())
    grpc_port, http_port = free_port(), free_port()
    ports = {str(DEFAULTS.grpc_port): str(grpc_port), str(DEFAULTS.http_port): str(http_port)}
    command = [ports.get(word, word) for word in teacher["command"]]
    assert command[0] == "python"
    command[0] = sys.executable
    env = {**os.environ, **{k: str(v) for k, v in teacher["environment"].items()}}
    env = {k: v for k, v in env.items() if not k.startswith("HOIDISTILL_") or k in teacher["environment"]}
    # What this machine changes: the model (no hub here), the Redis address, loopback only.
    env.update(
        HOIDISTILL_MODEL=str(tiny_blip_dir),
        HOIDISTILL_REDIS_URL=private_redis.url,
        HOIDISTILL_HOST="127.0.0.1",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    process = TeacherProcess(command, env)
    try:
        yield grpc_port, process, private_redis.url
    finally:
        process.stop()


def run_teacher_healthcheck(grpc_port: int) -> subprocess.CompletedProcess[str]:
    kind, program, *args = service("teacher")["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "python")
    args = [arg.replace(f"127.0.0.1:{DEFAULTS.grpc_port}", f"127.0.0.1:{grpc_port}") for arg in args]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.slow
def test_compose_teacher_serves_and_its_healthcheck_follows_it(
    compose_teacher: tuple[int, TeacherProcess, str],
) -> None:
    grpc_port, teacher, redis_url = compose_teacher
    teacher.wait_ready()
    healthy = run_teacher_healthcheck(grpc_port)
    assert healthy.returncode == 0, healthy.stderr

    from teacher_server.client import TeacherClient

    image = (REPO / "teacher_server" / "assets" / "person_riding_horse.jpg").read_bytes()
    with TeacherClient(f"grpc://127.0.0.1:{grpc_port}") as client:
        scores = client.score([image], [["a person ride a horse", "a person hold a cup"]], timeout_s=60)
    assert len(scores[0]) == 2
    # The compose environment's Redis setting is live: the scores went into that Redis.
    assert redis.Redis.from_url(redis_url).keys("hoidistill:*")

    # SIGTERM as `docker compose stop` sends it: the teacher drains and exits 0 within the grace period.
    teacher.process.send_signal(signal.SIGTERM)
    assert teacher.process.wait(timeout=duration_s(service("teacher")["stop_grace_period"])) == 0
    down = run_teacher_healthcheck(grpc_port)
    assert down.returncode != 0


def test_compose_redis_healthcheck_tells_up_from_down(private_redis: RedisServer) -> None:
    kind, script = service("redis")["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and script.startswith("redis-cli ")
    assert shutil.which("redis-cli"), "redis-cli ships with Debian's redis-tools (redis-server depends on it)"
    local = script.replace("redis-cli ", f"redis-cli -p {private_redis.port} ", 1)
    assert subprocess.run(["sh", "-c", local], check=False, timeout=30).returncode == 0
    private_redis.stop()
    assert subprocess.run(["sh", "-c", local], check=False, timeout=30).returncode != 0


# ---------------------------------------------------------------------------------------------
# Commands: parsed by the real parsers of the CLIs they run


def command_parser(package: str, command: str) -> argparse.ArgumentParser:
    """The argument parser of ``python -m PACKAGE COMMAND``, built as the package's CLI builds it."""
    commands = importlib.import_module(f"{package}.__main__").COMMANDS
    assert command in commands, f"`python -m {package} {command}` is not a command; known: {sorted(commands)}"
    parser = argparse.ArgumentParser(prog=f"{package} {command}", exit_on_error=False)
    importlib.import_module(commands[command][0]).add_arguments(parser)
    return parser


def parse_teacher_command(command: list[str]) -> argparse.Namespace:
    """``python -m teacher_server serve FLAGS`` -> the serve parser's namespace (unknown flags fail)."""
    assert command[:3] == ["python", "-m", "teacher_server"], command
    return command_parser("teacher_server", command[3]).parse_args(command[4:])


def parse_student_command(command: list[str]) -> argparse.Namespace:
    """``torchrun ... -m student CMD ...`` or ``python -m student CMD ...`` -> CMD's namespace.

    A torchrun prefix is parsed by torchrun's own parser; the namespace gets ``torchrun`` (or None).
    """
    launcher = None
    if command[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(command[1:])
        assert launcher.module and launcher.training_script == "student", command
        rest = launcher.training_script_args
    else:
        assert command[:3] == ["python", "-m", "student"], command
        rest = command[3:]
    args = command_parser("student", rest[0]).parse_args(rest[1:])
    args.torchrun = launcher
    args.command = rest[0]
    return args


def check_student_config(args: argparse.Namespace) -> None:
    """The config file exists in the repo and, with the command's overrides, loads and validates."""
    from student.commands.train import config_from_args

    # Relative to the image's working directory, which holds the repository's files.
    assert (REPO / args.config).is_file(), f"{args.config} is not in the repository"
    config_from_args(argparse.Namespace(**{**vars(args), "config": REPO / args.config}))


def test_the_command_parsers_reject_unknown_flags() -> None:
    # The checks below mean something only if a wrong flag fails.
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parse_teacher_command(["python", "-m", "teacher_server", "serve", "--grpc-prot", "1"])
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parse_student_command(["torchrun", "-m", "student", "train", "--output-directory", "/x"])
    with pytest.raises(AssertionError, match="not a command"):
        parse_student_command(["python", "-m", "student", "pre-warm"])


def test_compose_student_commands_parse_and_load_their_config() -> None:
    student = parse_student_command(service("student")["command"])
    assert student.command == "train" and student.torchrun.nproc_per_node == "1"
    check_student_config(student)
    prewarm = parse_student_command(service("prewarm")["command"])
    assert prewarm.command == "prewarm" and prewarm.torchrun is None
    assert prewarm.config == student.config
    assert [o for o in prewarm.overrides if o.startswith("data.")] == [
        o for o in student.overrides if o.startswith("data.")
    ], "prewarm scores the images training reads"


# ---------------------------------------------------------------------------------------------
# Dockerfiles and the build context


def dockerfile_commands(name: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKER_DIR / name)))


def arg_defaults(commands: list[dockerfile.Command]) -> dict[str, str]:
    return dict(command.value[0].split("=", 1) for command in commands if command.cmd == "ARG")


@pytest.mark.parametrize(("name", "extra"), [("Dockerfile.teacher", "teacher"), ("Dockerfile.student", "student")])
def test_dockerfile_builds_the_project_on_a_cuda_base_with_pinned_torch(name: str, extra: str) -> None:
    commands = dockerfile_commands(name)
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "STOPSIGNAL", "CMD"}
    assert {c.cmd for c in commands} <= known
    args = arg_defaults(commands)
    assert commands[0].cmd == "ARG" and commands[1].cmd == "FROM" and commands[1].value == ("${BASE_IMAGE}",)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["BASE_IMAGE"]
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", args["BASE_IMAGE"])
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{cuda[1]}{cuda[2]}"), "torch's CUDA build matches the base"
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)[1]
    assert args["TORCH_VERSION"] == makefile_torch

    runs = [c.value[0] for c in commands if c.cmd == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if '"torch==$TORCH_VERSION"' in run)
    assert '--index-url "$TORCH_INDEX_URL"' in runs[torch_step]
    project_step = next(i for i, run in enumerate(runs) if f'pip install ".[{extra}]"' in run)
    assert torch_step < project_step, "torch comes first, or the project's torch>=2.4 picks the build"
    extras = re.search(
        r"^\[project\.optional-dependencies\]\n(.*?)^\[",
        (REPO / "pyproject.toml").read_text(),
        re.MULTILINE | re.DOTALL,
    )[1]
    assert re.search(rf"^{extra} = \[", extras, re.MULTILINE), f"pyproject.toml has no [{extra}] extra"
    for run in runs:
        syntax = subprocess.run(["sh", "-n", "-c", run], capture_output=True, text=True, check=False)
        assert syntax.returncode == 0, f"{name}: RUN {run[:60]}...: {syntax.stderr}"

    user = [c.value[0] for c in commands if c.cmd == "USER"]
    assert user and not user[-1].startswith(("0", "root")), "runs as an unprivileged user"
    for copy_command in (c for c in commands if c.cmd == "COPY"):
        for source in copy_command.value[:-1]:
            assert (REPO / source).exists(), f"{name}: COPY {source}: not in the repository"
            assert not dockerignored(source), f"{name}: COPY {source}: excluded by .dockerignore"


def test_teacher_dockerfile_runs_what_compose_runs() -> None:
    commands = dockerfile_commands("Dockerfile.teacher")
    cmd = next(c for c in reversed(commands) if c.cmd == "CMD")
    assert list(cmd.value) == service("teacher")["command"]
    exposed = {int(port) for c in commands if c.cmd == "EXPOSE" for port in c.value}
    assert exposed == {DEFAULTS.grpc_port, DEFAULTS.http_port}
    env = next(c for c in commands if c.cmd == "ENV").value
    assert dict(zip(env[::2], env[1::2], strict=True))["HF_HOME"] == service("teacher")["environment"]["HF_HOME"]


@pytest.mark.parametrize("name", ["teacher", "student", "prewarm"])
def test_compose_builds_with_the_dockerfiles_arguments(name: str) -> None:
    build = service(name)["build"]
    path = Path(build["context"]) / build["dockerfile"]
    assert path.is_file(), path
    declared = arg_defaults(list(dockerfile.parse_file(str(path))))
    assert set(build["args"]) <= set(declared)
    for arg, value in build["args"].items():
        assert value == declared[arg], f"{name}: compose's default for {arg} differs from the Dockerfile's"


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule for one context path: the last matching pattern wins.

    A pattern matches the path or any of its parent directories; ``*`` and ``?`` stay within one
    path element, ``**`` spans any number, ``!`` re-includes.
    """
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((re.compile(regex), negated))
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for regex, negated in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_sends_only_the_sources() -> None:
    for kept in (
        "pyproject.toml",
        "README.md",
        "student/configs/demo.yaml",
        "teacher_server/engine.py",
        "teacher_server/assets/person_riding_horse.jpg",
        "teacher_server/_proto/hoidistill/teacher/v1/teacher_pb2.py",
    ):
        assert not dockerignored(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/demo/train/checkpoint.pth",
        "data/hico/x.jpg",
        "tests/teacher/test_cache.py",
        "student/__pycache__/config.cpython-311.pyc",
        "docker-compose.yml",
        "student/weights.pth",
        ".env",
        "protos/hoidistill/teacher/v1/teacher.proto",
    ):
        assert dockerignored(dropped), dropped


# ---------------------------------------------------------------------------------------------
# Kubernetes


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def walk_containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (and init container) spec anywhere in a resource, as kustomize finds them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from walk_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_containers(item)


@cache
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    """``kustomize build deploy/k8s`` for the features the kustomization uses (the test refuses others)."""
    spec = kustomization()
    assert set(spec) <= {"apiVersion", "kind", "namespace", "labels", "resources", "images"}, set(spec)
    images = {image["name"]: image for image in spec.get("images", [])}
    documents = []
    for name in spec["resources"]:
        for doc in load_documents(K8S_DIR / name):
            doc = copy.deepcopy(doc)
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = spec["namespace"]
            for group in spec.get("labels", []):
                assert set(group) == {"pairs"}, "only plain label pairs (no selectors, no templates)"
                doc["metadata"].setdefault("labels", {}).update(group["pairs"])
            for container in walk_containers(doc):
                name_only, _, tag = container["image"].partition(":")
                if name_only in images:
                    container["image"] = (
                        f"{images[name_only].get('newName', name_only)}:{images[name_only].get('newTag', tag)}"
                    )
            documents.append(doc)
    return tuple(documents)


def resource(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in rendered() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} resources"
    return matches[0]


def only_container(pod_spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec["containers"]
    assert len(containers) == 1
    assert name is None or containers[0]["name"] == name
    return containers[0]


def test_kustomization_lists_every_manifest_once() -> None:
    manifests = sorted(p.name for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization()["resources"]) == manifests
    assert len(set(kustomization()["resources"])) == len(manifests)
    used = {c["image"].partition(":")[0] for d in rendered() for c in walk_containers(d)}
    assert {image["name"] for image in kustomization()["images"]} == used & {
        "hoi-distill/teacher",
        "hoi-distill/student",
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_resource_matches_the_strict_schema(version: str) -> None:
    kinds = set()
    for doc in rendered():
        if doc["apiVersion"] == "kubeflow.org/v1":
            continue  # a CRD: checked against its own schema below
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
        "PersistentVolumeClaim",
        "Job",
    }


def test_the_strict_kubernetes_schema_rejects_a_broken_deployment() -> None:
    broken = copy.deepcopy(resource("Deployment", "hoi-teacher"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["portName"] = "grpc"  # no such field: gRPC probes take a number
    with pytest.raises(jsonschema.ValidationError, match="portName"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def kubernetes_definitions(version: str) -> Resource:
    # The schema set kubernetes-validate itself uses for this version: the newest not newer than it.
    known = [v for v in kubernetes_validate.utils.all_versions() if kubernetes_validate.utils.major_minor(v) == version]
    assert known, f"kubernetes-validate has no schemas for Kubernetes {version}"
    directory = f"v{known[-1]}-local-strict"
    path = files("kubernetes_validate") / "kubernetes-json-schema" / directory / "_definitions.json"
    contents = json.loads(path.read_text())
    assert contents["$id"] == K8S_DEFINITIONS_ID
    return Resource.from_contents(contents)


def _k8s(name: str) -> dict[str, str]:
    return {"$ref": f"{K8S_DEFINITIONS_ID}#/$defs/{name}"}


# The PyTorchJob custom resource (Kubeflow training-operator, kubeflow.org/v1), written from the
# operator's API types: PyTorchJobSpec{runPolicy, elasticPolicy, pytorchReplicaSpecs, nprocPerNode},
# ReplicaSpec{replicas, template, restartPolicy}; replica types Master and Worker.
_REPLICA_SPEC: dict[str, Any] = {
    "type": "object",
    "required": ["replicas", "template"],
    "additionalProperties": False,
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _k8s("io.k8s.api.core.v1.PodTemplateSpec"),
    },
}
PYTORCHJOB_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": _k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        "spec": {
            "type": "object",
            "required": ["pytorchReplicaSpecs"],
            "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": "^([1-9][0-9]*|auto|cpu|gpu)$"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["None", "All", "Running"]},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "suspend": {"type": "boolean"},
                        "managedBy": {"type": "string"},
                        "schedulingPolicy": {"type": "object"},
                    },
                },
                "elasticPolicy": {"type": "object"},
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "Master": {
                            **_REPLICA_SPEC,
                            "properties": {**_REPLICA_SPEC["properties"], "replicas": {"const": 1}},
                        },
                        "Worker": _REPLICA_SPEC,
                    },
                },
            },
        },
    },
}


def validate_pytorchjob(job: dict[str, Any], version: str) -> None:
    registry = Registry().with_resource(K8S_DEFINITIONS_ID, kubernetes_definitions(version))
    jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA, registry=registry).validate(job)
    for replica_type, replica in job["spec"]["pytorchReplicaSpecs"].items():
        names = [c["name"] for c in replica["template"]["spec"]["containers"]]
        # The operator injects its variables into, and reads the rendezvous port from, "pytorch".
        assert "pytorch" in names, f"{replica_type}: no container named pytorch"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pytorchjob_matches_the_crd_schema(version: str) -> None:
    validate_pytorchjob(resource("PyTorchJob", "hoi-student"), version)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda spec: spec["pytorchReplicaSpecs"].update(Chief=spec["pytorchReplicaSpecs"]["Worker"]), "Chief"),
        (lambda spec: spec["pytorchReplicaSpecs"]["Master"].update(replicas=2), "1 was expected"),
        (lambda spec: spec["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"), "Sometimes"),
        (lambda spec: spec.update(nprocPerNode=4), "not of type 'string'"),
        # The pod templates are checked by Kubernetes' own (strict) PodTemplateSpec schema.
        (lambda spec: spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"].update(gpus=4), "gpus"),
    ],
    ids=["unknown-replica-type", "two-masters", "bad-restart-policy", "nproc-not-a-string", "unknown-pod-field"],
)
def test_pytorchjob_schema_rejects_what_the_operator_rejects(mutate: Any, message: str) -> None:
    job = copy.deepcopy(resource("PyTorchJob", "hoi-student"))
    mutate(job["spec"])
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_pytorchjob(job, K8S_VERSIONS[-1])


def teacher_pod() -> dict[str, Any]:
    return resource("Deployment", "hoi-teacher")["spec"]["template"]


def test_teacher_deployment_one_gpu_per_replica_and_grpc_health_probes() -> None:
    deployment = resource("Deployment", "hoi-teacher")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    container = only_container(teacher_pod()["spec"], "teacher")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = parse_teacher_command(container["command"])
    config = resource("ConfigMap", "hoi-teacher-config")["data"]
    settings = settings_from_args(args, env=config)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "http": settings.http_port}
    assert settings.grpc_port == DEFAULTS.grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.grpc_port}, probe
    annotations = teacher_pod()["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.http_port
    # Termination: preStop pause + the service's drain must fit in the grace period.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert teacher_pod()["spec"]["terminationGracePeriodSeconds"] > pause + settings.drain_timeout_s
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert mounts["hf-cache"] == env["HF_HOME"]
    assert container["envFrom"] == [{"configMapRef": {"name": "hoi-teacher-config"}}]


def test_teacher_configmap_is_a_valid_settings_set_pointing_at_redis() -> None:
    config = resource("ConfigMap", "hoi-teacher-config")["data"]
    assert all(key.startswith("HOIDISTILL_") for key in config)
    settings = ServerSettings.from_env(config)  # unknown variables and bad values raise SettingsError
    redis_url = urlparse(settings.redis_url)
    redis_service = resource("Service", "hoi-redis")
    assert redis_url.hostname == redis_service["metadata"]["name"]
    assert redis_url.port == redis_service["spec"]["ports"][0]["port"]
    assert settings.device == ("cuda:0",), "one GPU per pod: the pod's only GPU (cuda reads as cuda:0)"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_teacher_services_route_grpc_and_http_to_the_pods() -> None:
    pod_labels = teacher_pod()["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in only_container(teacher_pod()["spec"])["ports"]}
    for name in ("hoi-teacher", "hoi-teacher-headless"):
        spec = resource("Service", name)["spec"]
        assert selects(spec["selector"], pod_labels), name
        ports = {port["name"]: port for port in spec["ports"]}
        assert set(ports) == {"grpc", "http"}
        for port_name, port in ports.items():
            assert port["targetPort"] == port_name and port["port"] == container_ports[port_name]
    assert resource("Service", "hoi-teacher-headless")["spec"]["clusterIP"] == "None"
    assert resource("Service", "hoi-teacher")["spec"].get("clusterIP") != "None"
    deployment_selector = resource("Deployment", "hoi-teacher")["spec"]["selector"]["matchLabels"]
    assert selects(deployment_selector, pod_labels)
    assert selects(resource("PodDisruptionBudget", "hoi-teacher")["spec"]["selector"]["matchLabels"], pod_labels)


def test_hpa_scales_the_teacher_deployment_on_its_queue_metric() -> None:
    hpa = resource("HorizontalPodAutoscaler", "hoi-teacher")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "hoi-teacher"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    metric_names = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    from teacher_server.metrics import ServiceMetrics

    exported = {metric.name for metric in ServiceMetrics().registry.collect()}
    assert metric_names and metric_names <= exported, f"{metric_names} not among {sorted(exported)}"
    container = only_container(teacher_pod()["spec"])
    assert "cpu" in container["resources"]["requests"], "a CPU utilisation target needs a CPU request"
    assert resource("PodDisruptionBudget", "hoi-teacher")["spec"]["minAvailable"] < hpa["minReplicas"]


def test_redis_statefulset_is_reachable_through_its_service() -> None:
    statefulset = resource("StatefulSet", "hoi-redis")["spec"]
    service_spec = resource("Service", "hoi-redis")["spec"]
    assert statefulset["serviceName"] == "hoi-redis" and service_spec["clusterIP"] == "None"
    assert selects(service_spec["selector"], statefulset["template"]["metadata"]["labels"])
    container = only_container(statefulset["template"]["spec"], "redis")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[service_spec["ports"][0]["targetPort"]] == service_spec["ports"][0]["port"] == 6379
    # The cache must evict rather than fail writes, and stay under the container's memory limit.
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    maxmemory_gb = int(args[args.index("--maxmemory") + 1].removesuffix("gb"))
    limit_gi = int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert maxmemory_gb < limit_gi
    assert container["readinessProbe"]["exec"]["command"][-1] == service("redis")["healthcheck"]["test"][1]


def expand_kubernetes_variables(words: list[str], env: dict[str, str]) -> list[str]:
    """Kubelet's ``$(VAR)`` expansion of command words; an undefined variable fails the test."""

    def replace(match: re.Match[str]) -> str:
        assert match[1] in env, f"$({match[1]}) is neither in the container's env nor set by the operator"
        return env[match[1]]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, word) for word in words]


def operator_environment(job: dict[str, Any], replica_type: str, index: int) -> dict[str, str]:
    """The variables the training-operator (v1.7+) adds to a PyTorchJob pod."""
    replicas = job["spec"]["pytorchReplicaSpecs"]
    master = only_container(replicas["Master"]["template"]["spec"], "pytorch")
    port = next(p["containerPort"] for p in master["ports"] if p["name"] == "pytorchjob-port")
    nnodes = sum(replica["replicas"] for replica in replicas.values())
    rank = index + (1 if replica_type == "Worker" else 0)
    nproc = job["spec"]["nprocPerNode"]
    return {
        "MASTER_ADDR": f"{job['metadata']['name']}-master-0",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nnodes * int(nproc)),
        "RANK": str(rank),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NODE_RANK": str(rank),
        "PET_NNODES": str(nnodes),
    }


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_pytorchjob_runs_torchrun_over_every_node_and_gpu() -> None:
    job = resource("PyTorchJob", "hoi-student")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Worker"]["replicas"] >= 1
    assert replicas["Master"]["template"] == replicas["Worker"]["template"], "one pod spec for every node"
    for replica_type, replica in replicas.items():
        assert replica["restartPolicy"] == "OnFailure"
        container = only_container(replica["template"]["spec"], "pytorch")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(job["spec"]["nprocPerNode"])
        env = {**operator_environment(job, replica_type, 0), **container_env(container)}
        args = parse_student_command(expand_kubernetes_variables(container["command"], env))
        launcher = args.torchrun
        assert args.command == "train"
        assert launcher.nnodes == str(sum(r["replicas"] for r in replicas.values()))
        assert launcher.nproc_per_node == job["spec"]["nprocPerNode"]
        assert launcher.node_rank == (0 if replica_type == "Master" else 1)
        assert (launcher.master_addr, launcher.master_port) == (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
        assert args.resume == "auto", "a restarted pod continues from the last checkpoint"
        check_student_config(args)


def test_student_pods_reach_the_headless_teacher_service_and_mount_their_volumes() -> None:
    job = resource("PyTorchJob", "hoi-student")
    prewarm = resource("Job", "hoi-prewarm")["spec"]["template"]["spec"]
    claims = {d["metadata"]["name"]: d for d in rendered() if d["kind"] == "PersistentVolumeClaim"}
    pods = [("prewarm", prewarm, only_container(prewarm, "prewarm"), {})]
    for replica_type, replica in job["spec"]["pytorchReplicaSpecs"].items():
        container = only_container(replica["template"]["spec"], "pytorch")
        pods.append((replica_type, replica["template"]["spec"], container, operator_environment(job, replica_type, 0)))
    for name, pod, container, operator_env in pods:
        env = {**operator_env, **container_env(container)}
        args = parse_student_command(expand_kubernetes_variables(container["command"], env))
        target = urlparse(args.teacher)
        headless = resource("Service", "hoi-teacher-headless")
        assert (target.scheme, target.hostname) == ("grpc", headless["metadata"]["name"]), name
        assert target.port == next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        data = next(o for o in args.overrides if o.startswith("data.root="))
        data_mount = mounts["/data"]
        assert data.removeprefix("data.root=").startswith("/data/") and data_mount.get("readOnly")
        if name != "prewarm":
            assert "pretrained=/data/params/detr-r50-e632da11.pth" in args.overrides, name
        for mount in mounts.values():
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            assert claim is None or claim["claimName"] in claims, f"{name}: no PVC {claim}"
        if name != "prewarm":
            assert args.output_dir.startswith(next(p for p in mounts if mounts[p]["name"] == "checkpoints"))
            assert "ReadWriteMany" in claims["hoi-checkpoints"]["spec"]["accessModes"], "every node reads it"
            assert mounts["/dev/shm"]["name"] == "dshm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        else:
            assert parse_student_command(container["command"]).command == "prewarm"


def test_pods_run_as_the_images_unprivileged_user() -> None:
    for doc in rendered():
        for pod_spec in _pod_specs(doc):
            context = pod_spec["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, doc["metadata"]["name"]
            for container in pod_spec["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
    image_user = [c.value[0] for c in dockerfile_commands("Dockerfile.teacher") if c.cmd == "USER"][-1]
    assert image_user.split(":")[0] == str(teacher_pod()["spec"]["securityContext"]["runAsUser"])


def _pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        yield doc["spec"]["template"]["spec"]
    elif doc["kind"] == "PyTorchJob":
        for replica in doc["spec"]["pytorchReplicaSpecs"].values():
            yield replica["template"]["spec"]


# ---------------------------------------------------------------------------------------------
# Documentation


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def compose_variables() -> dict[str, str]:
    """``${NAME:-default}`` interpolations of both compose files -> default (one default per name)."""
    found: dict[str, str] = {}
    for path in (COMPOSE, COMPOSE_CPU):
        for text in _strings(yaml.load(path.read_text(), Loader=OverrideLoader)):  # SafeLoader subclass
            for name, default in re.findall(r"\$\{([A-Z0-9_]+):-([^}]*)\}", text):
                assert found.setdefault(name, default) == default, f"${{{name}}} has two defaults"
    assert found, "no ${NAME:-default} found: the pattern is out of date"
    return found


def test_compose_variables_stay_out_of_the_teacher_settings_namespace() -> None:
    # The teacher refuses unknown HOIDISTILL_* variables; a compose variable exported in a shell
    # under that prefix would break `python -m teacher_server serve` started from the same shell.
    assert not [name for name in compose_variables() if name.startswith("HOIDISTILL_")]


def test_deploy_doc_lists_every_compose_variable_with_its_default() -> None:
    doc = DEPLOY_DOC
    text = doc.read_text()
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", text, re.MULTILINE))
    variables = compose_variables()
    assert set(rows) >= set(variables), f"{doc.name}: undocumented: {sorted(set(variables) - set(rows))}"
    for name, default in variables.items():
        assert rows[name] == default, f"{doc.name}: {name} default {rows[name]!r}, compose says {default!r}"


# Global options of `docker compose` that take a value; the first word after the options is the verb.
_COMPOSE_VALUE_OPTIONS = {"-f", "--file", "-p", "--project-name", "--project-directory", "--profile", "--env-file"}
# Verbs whose positional arguments are all service names (the flags used with them take no value).
_SERVICE_VERBS = {"up", "down", "logs", "ps", "restart", "start", "stop", "build", "pull", "run", "exec", "cp"}


def compose_invocations(doc: Path) -> Iterator[tuple[str, list[str], str, list[str]]]:
    """(line, compose files, verb, positional arguments) of every docker compose command line."""
    for line in doc.read_text().splitlines():
        if not re.match(r"\s*docker[ -]compose\b", line):
            continue
        words = shlex.split(line.split(" #")[0].strip())
        if words[:2] == ["docker", "compose"]:
            rest = words[2:]
        elif words[:1] == ["docker-compose"]:
            rest = words[1:]
        else:
            continue
        compose_files = []
        while rest and rest[0].startswith("-"):
            if rest[0] in _COMPOSE_VALUE_OPTIONS:
                if rest[0] in ("-f", "--file"):
                    compose_files.append(rest[1])
                rest = rest[2:]
            else:
                rest = rest[1:]
        yield line, compose_files, rest[0], [word for word in rest[1:] if not word.startswith("-")]


@pytest.mark.parametrize("doc", COMPOSE_DOCS, ids=lambda p: p.name)
def test_docs_compose_commands_name_real_files_and_services(doc: Path) -> None:
    services = set(compose()["services"])
    invocations = list(compose_invocations(doc))
    assert invocations, f"{doc.name} shows no docker compose command"
    for line, compose_files, verb, positional in invocations:
        for name in compose_files:
            assert (REPO / name).is_file(), f"{doc.name}: {line}: no {name}"
        if verb == "cp":
            positional = [positional[0].split(":")[0]]
        if verb in _SERVICE_VERBS:
            assert set(positional) <= services, f"{doc.name}: {line}: {set(positional) - services} not services"


def test_deploy_doc_explains_every_manifest_and_service() -> None:
    text = DEPLOY_DOC.read_text()
    for path in K8S_DIR.glob("*.yaml"):
        assert f"`{path.name}`" in text, f"docs/deploy.md does not mention {path.name}"
    for name in compose()["services"]:
        assert f"`{name}`" in text, f"docs/deploy.md does not mention the {name} service"
    for topic in ("Redis Cluster", "HorizontalPodAutoscaler", "Worker", "docker-compose.cpu.yml", "kustomize"):
        assert topic in text, topic
