"""Helpers the tests share, importable from any test folder (``pythonpath = ["tests"]``).

``servers``: free ports and real Redis servers; ``teacher``: an in-process teacher server, the
reference engine, a gated engine; ``http``: the HTTP server harness; ``processes``: the teacher
and student as child processes; ``student``: tiny training overrides and synthetic data;
``hostile``: hostile input for every door of the teacher and the oracle that judges the answers.
Fixtures live in the ``conftest.py`` of the folder whose tests use them.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "student" / "configs" / "demo.yaml"
