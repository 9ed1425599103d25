"""Hostile input at every door of the teacher: a bounded fuzzing run against a real server.

    python bench/fuzz_doors.py --cases 5000 --door all       # issue 15's bounded run (long)
    python bench/fuzz_doors.py --cases 200 --door kserve     # one door, minutes

Starts ``python -m teacher_server serve`` as a child process (default settings but for the
model: a tiny random BLIP saved to a temporary directory, or ``--model``), then for each door
sends ``--cases`` Hypothesis-generated cases one at a time (``tests/testkit/hostile.py`` holds the
strategies, the doors and the oracle): ``native`` (TeacherService, messages with hostile contents,
bytes that are no protobuf, streams mixing both with good messages), ``kserve``
(GRPCInferenceService the same way), ``images`` (expensive and broken image files through
``Score``), ``http`` (bodies of every wrong kind), ``raw`` (garbage on the gRPC and HTTP ports).

Per case: the status labels, the server's CPU time (all its threads, from /proc, 10 ms ticks)
and the client's wall time. Every ``--good-every`` cases, and at the end of each door, a
known-good request must get the scores of a direct engine call. RSS is read at the start of a
door, after its first tenth of cases (warm) and at its end. A failure is an INTERNAL / UNKNOWN /
UNAVAILABLE gRPC status, an HTTP 5xx or undocumented status or an error body that is not the
API's JSON error, a stream that ends before answering every message, a call unanswered after
60 s, a case over the CPU bound (``CPU_BOUND_MS``), a wrong or failed good request, a dead
server, or RSS at the end of a door over its bound (``DoorReport.rss_bound_mb``). Hypothesis runs
only its generate phase (no shrinking; failures are recorded with their case and the run goes
on); ``--seed`` makes a run repeatable.

Prints one table row per door, the first failures of each, the server log's tracebacks (counted,
one of each kind printed; ``--server-log`` keeps the whole log), and, last, one JSON line: per
door cases, statuses, failures, max CPU ms per case, RSS start/warm/end/peak/bound. The exit
status is 1 when any door saw a failure, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # testkit: the strategies and the oracle the tests use

from hypothesis import HealthCheck, Phase, seed, settings  # noqa: E402
from testkit.hostile import (  # noqa: E402
    CPU_BOUND_MS,
    DOORS,
    RSS_BOUND_FRACTION,
    RSS_BOUND_MIN_MB,
    DoorReport,
    FuzzTarget,
    door_cases,
    engine_expected,
    run_door,
)
from testkit.processes import TeacherProcess  # noqa: E402


def tracebacks(log: list[str]) -> list[str]:
    """The tracebacks in the server's log, each as one string."""
    found, current = [], None
    for line in log:
        if line.startswith("Traceback"):
            current = [line]
            found.append(current)
        elif current is not None and (line.startswith((" ", "\t")) or not line.strip()):
            current.append(line)
        elif current is not None:
            current.append(line)  # the exception line ends it
            current = None
    return ["".join(lines) for lines in found]


def print_table(reports: list[DoorReport]) -> None:
    print(
        f"{'door':8} {'cases':>6} {'fail':>5} {'good':>5} {'max cpu ms':>10} {'max wall ms':>11} "
        f"{'rss start':>9} {'rss warm':>8} {'rss end':>8} {'rss peak':>8}  statuses"
    )
    for r in reports:
        statuses = ", ".join(f"{k}={v}" for k, v in sorted(r.statuses.items(), key=lambda kv: -kv[1]))
        print(
            f"{r.door:8} {r.cases:6d} {len(r.failures):5d} {r.good_checks:5d} {r.max_cpu_ms:10.0f} "
            f"{r.max_wall_ms:11.0f} {r.rss_start_mb:9.0f} {r.rss_warm_mb:8.0f} "
            f"{r.rss_end_mb:8.0f} {r.rss_peak_mb:8.0f}  {statuses}"
        )
    print(
        f"bounds: CPU per case <= {CPU_BOUND_MS:.0f} ms; RSS end <= RSS after the first tenth of the "
        f"door's cases (warm) + max({RSS_BOUND_MIN_MB:.0f} MiB, {RSS_BOUND_FRACTION:.0%})"
    )
    for r in reports:
        if r.failures:
            print(f"\n{r.door}: {len(r.failures)} failures, the first:")
            for failure in r.failures[:5]:
                print(f"  {failure}")
        print(f"{r.door}: costliest case ({r.max_cpu_ms:.0f} ms CPU): {r.max_cpu_case[:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--cases", type=int, default=5000, help="cases per door (default 5000)")
    parser.add_argument("--door", choices=[*DOORS, "all"], default="all")
    parser.add_argument("--model", type=Path, help="model directory (default: a tiny random BLIP, made here)")
    parser.add_argument("--good-every", type=int, default=100, help="a known-good request every N cases")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (same seed, same cases)")
    parser.add_argument("--server-log", type=Path, help="write the server's whole output (its log) to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    doors = list(DOORS) if args.door == "all" else [args.door]

    with tempfile.TemporaryDirectory(prefix="fuzz-doors-") as scratch:
        model = args.model
        if model is None:
            from teacher_server.tiny_model import make_tiny_model

            model = Path(scratch) / "tiny-blip"
            make_tiny_model(model, seed=0)
        teacher = TeacherProcess(model)
        teacher.start()
        target = FuzzTarget(teacher, engine_expected(model))
        reports = []
        started = time.monotonic()
        try:
            for _ in range(3):  # warm up: the first requests load lazily built parts
                target.check_good()
            for door in doors:
                door_started = time.monotonic()
                generate = settings(
                    max_examples=args.cases,
                    phases=[Phase.generate],  # no shrinking: record each failure and go on
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                report = run_door(
                    target,
                    door,
                    door_cases(door),
                    lambda test, generate=generate: seed(args.seed)(generate(test)),
                    examples=args.cases,
                    good_every=args.good_every,
                    strict=False,
                )
                reports.append(report)
                print(f"[{door}: {reports[-1].cases} cases in {time.monotonic() - door_started:.0f} s]", flush=True)
        finally:
            target.close()
            alive = target.alive()
            teacher.kill()
        print_table(reports)
        if args.server_log is not None:
            args.server_log.write_text("".join(teacher.output))
        found = tracebacks(teacher.output)
        print(f"\nserver log: {len(teacher.output)} lines, {len(found)} tracebacks")
        distinct: dict[str, int] = {}
        for text in found:
            distinct[text.strip().splitlines()[-1][:200]] = distinct.get(text.strip().splitlines()[-1][:200], 0) + 1
        for last_line, count in sorted(distinct.items(), key=lambda kv: -kv[1]):
            print(f"  {count:6d} x {last_line}")
        shown = set()
        for text in found:  # one full traceback of each kind
            last = text.strip().splitlines()[-1][:200]
            if last not in shown:
                shown.add(last)
                print(text)
        print(
            json.dumps(
                {
                    "doors": [r.as_dict() for r in reports],
                    "failures": sum(len(r.failures) for r in reports),
                    "server_alive_at_end": alive,
                    "tracebacks": len(found),
                    "cpu_bound_ms": CPU_BOUND_MS,
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
        )
    # Non-zero when the oracle saw a failure, so that CI or a script can gate on the run.
    return 1 if any(r.failures for r in reports) or not alive else 0


if __name__ == "__main__":
    raise SystemExit(main())
