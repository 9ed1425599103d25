"""The teacher and the student as child processes (what docker compose runs, without Docker)."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from testkit import REPO
from testkit.servers import free_port
from testkit.student import tiny_overrides

READY_TIMEOUT_S = 120
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without HOIDISTILL_ settings (every default applies), one thread per
    process, unbuffered output (lines arrive as they are printed); then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOIDISTILL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


class TeacherProcess:
    """``python -m teacher_server serve`` on fixed ports; ``start`` again after ``kill`` to restart it."""

    def __init__(self, model_dir: Path, redis_url: str | None = None) -> None:
        self.model_dir = model_dir
        self.redis_url = redis_url
        self.grpc_port, self.http_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.output: list[str] = []  # every line the process printed (its log), for reports

    @property
    def endpoint(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        args = ["--model", str(self.model_dir), "--device", "cpu", "--dtype", "fp32", "--host", "127.0.0.1"]
        args += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "teacher_server", "serve", *args],
            cwd=REPO,
            env=clean_env(HOIDISTILL_MAX_DELAY_MS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",  # gRPC core may log bytes a client sent; the pump must not die on them
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        seen = []
        while True:
            line = lines.get(timeout=READY_TIMEOUT_S)
            if line is None:
                raise AssertionError("teacher exited before it was ready:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("teacher ready"):
                return

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def metric(self, name: str) -> float:
        """One unlabelled sample of the teacher's /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


def topology_overrides(root: Path, output: Path, *extra: str) -> list[str]:
    """``tiny_overrides`` for the topology's runs: batches of 2 logged every step, 2 epochs, and
    distill.variant=kl: every matched pair with two scored candidates gets a term, whatever the
    tiny random teacher says (soft, the default, adds a term only where the teacher is confident)."""
    return tiny_overrides(
        root,
        output,
        "optim.batch_size=2",
        "schedule.epochs=2",
        "schedule.lr_drop=[10]",
        "run.log_every=1",
        "distill.variant=kl",
        *extra,
    )


def torchrun_command(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    return [
        *TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max_restarts={max_restarts}",
        "-m",
        "student",
        *args,
    ]
