"""``python -m teacher_server serve`` as a real subprocess: serve, score, /metrics, SIGTERM, exit 0."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from testkit import REPO
from testkit.processes import READY_TIMEOUT_S, clean_env
from testkit.servers import free_port
from testkit.teacher import png_bytes

from teacher_server.client import TeacherClient
from teacher_server.settings import ServerSettings, flag_name


class ServeProcess:
    """A ``serve`` subprocess whose stdout lines are collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "teacher_server", "serve", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: queue.Queue[str | None] = queue.Queue()
        self._stderr_seen: list[str] = []
        threading.Thread(target=self._pump, args=(self.process.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self._stderr), daemon=True).start()

    @staticmethod
    def _pump(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        while not self._stderr.empty():
            line = self._stderr.get()
            if line is not None:
                self._stderr_seen.append(line)
        return "".join(self._stderr_seen)

    def wait_ready(self) -> str:
        while True:
            line = self.lines.get(timeout=READY_TIMEOUT_S)
            if line is None:
                self.process.wait(timeout=30)
                raise AssertionError(f"serve exited before it was ready:\n{self.stderr()}")
            if line.startswith("teacher ready"):
                return line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def serve_process() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for process in started:
        process.stop()


def test_serve_scores_exposes_metrics_and_exits_cleanly_on_sigterm(tiny_blip_dir, serve_process):
    grpc_port, http_port = free_port(), free_port()
    server = ServeProcess(
        [
            "--model",
            str(tiny_blip_dir),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(grpc_port),
        ],
        # Settings also come from the environment: the HTTP port, the batching delay and the log
        # format (JSON lines, as a log collector reads them) here.
        env=clean_env(HOIDISTILL_HTTP_PORT=str(http_port), HOIDISTILL_MAX_DELAY_MS="1", HOIDISTILL_LOG_FORMAT="json"),
    )
    serve_process.append(server)
    assert server.wait_ready() == f"teacher ready: grpc port {grpc_port}, http port {http_port}\n"

    with TeacherClient(f"127.0.0.1:{grpc_port}") as client:
        scores = client.score([png_bytes(1)], [["a person ride a horse", "a person eat a pizza"]])
    assert len(scores[0]) == 2 and all(0.0 <= s.match_prob <= 1.0 for s in scores[0])
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        metrics = response.read().decode()
    assert 'hoidistill_teacher_requests_total{code="OK",method="hoidistill.teacher.v1.TeacherService/Score"}' in metrics
    assert "hoidistill_teacher_images_encoded_total 1.0" in metrics
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/nothing", timeout=10)
    assert missing.value.code == 404

    # A second server on the same gRPC port must fail loudly, not share the port.
    clash = subprocess.run(
        [
            sys.executable,
            "-m",
            "teacher_server",
            "serve",
            "--model",
            str(tiny_blip_dir),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(free_port()),
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
    )
    assert clash.returncode == 2
    assert f"grpc_port: cannot listen on 127.0.0.1:{grpc_port}" in clash.stderr

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    server.lines.get(timeout=10)  # end of stdout: the pumps have seen everything
    log = server.stderr()
    assert "shutting down" in log and "teacher stopped" in log
    records = [json.loads(line) for line in log.splitlines()]  # nothing else on stderr: JSON lines only
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)
    (started,) = [record for record in records if record["message"].startswith("teacher gRPC server on")]
    assert (started["logger"], started["grpc_port"], started["tls"]) == ("teacher_server.server", grpc_port, False)
    assert any(record["message"] == "teacher stopped" for record in records)
    assert any(record["logger"].startswith("uvicorn") for record in records)  # the libraries' records too


def test_help_documents_every_setting():
    done = subprocess.run(
        [sys.executable, "-m", "teacher_server", "serve", "--help"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for name in ServerSettings.model_fields:
        assert flag_name(name) in done.stdout
        assert f"HOIDISTILL_{name.upper()}" in done.stdout.replace("\n", "").replace(" ", "")


def test_bad_setting_exits_2_naming_the_variable():
    done = subprocess.run(
        [sys.executable, "-m", "teacher_server", "serve"],
        cwd=REPO,
        env=clean_env(HOIDISTILL_GRPC_PORT="fifty"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "HOIDISTILL_GRPC_PORT" in done.stderr and "fifty" in done.stderr
