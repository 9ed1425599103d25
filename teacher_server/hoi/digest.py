"""The content address of an image: SHA-256 of its file bytes, the one digest of the project.

Every cache key carries it (``teacher_server.cache.score_key``), a request may send it instead of
the bytes, and the student's data loader, prewarm and the clients compute it, so an entry written
by one is found by all the others. hashlib only: the Triton model's side environment, which has
neither redis nor the student, imports it through the engine.
"""

from __future__ import annotations

import hashlib
import re

DIGEST_LENGTH = 64
_DIGEST = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: "$" would accept a trailing newline


def image_digest(data: bytes) -> str:
    """SHA-256 hex (64 lowercase characters) of an image's file bytes, as they were read or sent."""
    return hashlib.sha256(data).hexdigest()


def is_digest(text: object) -> bool:
    """Whether ``text`` has the form of an image digest (64 lowercase hex characters)."""
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None
