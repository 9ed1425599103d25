"""The teacher's exception types: one base, a few precise kinds that transports map to codes."""

from __future__ import annotations


class TeacherError(Exception):
    """Base of every error the teacher raises on purpose."""


class ModelLoadError(TeacherError):
    """The model or processor could not be loaded (missing, corrupt, wrong kind)."""


class InvalidInputError(TeacherError):
    """A request field is malformed or over a limit.

    ``field`` names the offending field (``image``, ``sentences[3]``, ``TEXT``) so that every
    transport can show it; the message also names the limit when one was exceeded.
    Maps to gRPC ``INVALID_ARGUMENT`` and HTTP 422 (413 for size limits, see ``too_large``).
    """

    def __init__(self, field: str, message: str, *, too_large: bool = False) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message
        self.too_large = too_large


class ImageRequiredError(TeacherError):
    """A request named an image only by digest and the teacher does not hold that image."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"image required: the teacher does not know image {digest}; resend its bytes")
        self.digest = digest


class OverloadedError(TeacherError):
    """The teacher cannot take the work now (queue full); retry after ``retry_after_s`` (gRPC
    ``RESOURCE_EXHAUSTED``, HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeviceOutOfMemoryError(OverloadedError):
    """The engine's device ran out of memory for a pair even when scored alone (after the batch
    was retried in halves); like a full queue: gRPC ``RESOURCE_EXHAUSTED``, HTTP 429."""


class FinetuneError(TeacherError, ValueError):
    """Fine-tuning input or state is wrong: the message names the file, line or field, and why."""
