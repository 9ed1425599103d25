"""Settings of the teacher service: one typed object, filled from defaults, env and flags.

Precedence is ``flags > HOIDISTILL_* environment variables > defaults``. Every field has exactly
one environment variable (``HOIDISTILL_`` + the field name in upper case) and one flag (``--`` +
the field name with dashes), both generated from the field list below, so the three can never
drift apart. This module does not import torch: the CLI's ``--help`` and config checks stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from teacher_server.errors import TeacherError

ENV_PREFIX = "HOIDISTILL_"
MiB = 1024 * 1024
DTYPES = ("auto", "fp32", "bf16", "fp16")
ITM_START_TOKENS = ("cls", "enc")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
_SECRET_FIELDS = frozenset({"auth_token"})


class SettingsError(TeacherError, ValueError):
    """A setting has an invalid value; the message names the variable or flag and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Parsers: text (from env or argv) -> typed value. Each raises ValueError with a short reason; the
# caller prefixes the source (variable or flag name).


def _parse_int(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _parse_str(text: str) -> str:
    return text.strip()


def _parse_optional_str(text: str) -> str | None:
    # An empty variable (HOIDISTILL_REDIS_URL=) means "not set": compose files often write that.
    text = text.strip()
    return text or None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE[:-1])}, got {text!r}")


def _parse_devices(text: str) -> tuple[str, ...]:
    devices = tuple(part.strip() for part in text.split(","))
    if not text.strip() or any(not device for device in devices):
        raise ValueError(f"expected a comma-separated device list such as 'cuda:0,cuda:1', got {text!r}")
    return devices


def canonical_device(name: str) -> str:
    """``cuda`` -> ``cuda:0`` and ``xpu`` -> ``xpu:0``; every other name as it is.

    torch's bare ``cuda`` is the process's current device, which the service never changes:
    device 0. Without this, ``cuda,cuda:0`` would load two engine copies onto one GPU.
    """
    return f"{name}:0" if name in ("cuda", "xpu") else name


# ---------------------------------------------------------------------------------------------
# Checks: typed value -> None or the reason it is invalid.


def _at_least(minimum: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be >= {minimum}, got {value}"

    return check


def _port(value: int) -> str | None:
    # 0 asks the OS for a free port (tests and side-by-side benches use it).
    return None if 0 <= value <= 65535 else f"must be a TCP port 0..65535, got {value}"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}; got {value!r}"

    return check


def _devices(value: tuple[str, ...]) -> str | None:
    if not value:
        return "needs at least one device"
    bad = [device for device in value if not _DEVICE_PATTERN.match(device)]
    if bad:
        return f"unknown device {bad[0]!r}: use auto, cpu, mps, cuda, cuda:N or xpu:N"
    canonical = [canonical_device(device) for device in value]
    if len(set(canonical)) != len(canonical):
        aliases = sorted({f"{d} is {c}" for d, c in zip(value, canonical, strict=True) if d != c})
        return f"lists a device twice: {','.join(value)}" + (f" ({', '.join(aliases)})" if aliases else "")
    if "auto" in value and len(value) > 1:
        return "'auto' picks one device by itself and cannot be combined with others"
    return None


def _redis_url(value: str | None) -> str | None:
    if value is None or value.startswith(("redis://", "rediss://", "unix://")):
        return None
    return f"must start with redis://, rediss:// or unix://, got {value.split('://')[0]!r}://..."


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _setting(
    default: Any,
    help_text: str,
    parse: Callable[[str], Any],
    check: Callable[[Any], str | None] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field carrying its help text, text parser and value check."""
    return field(
        default=default,
        repr=True,
        metadata={"help": help_text, "parse": parse, "check": check, "metavar": metavar},
    )


@dataclass(frozen=True)
class ServerSettings:
    """Everything the teacher service can be told; safe defaults for a single-node run.

    Field ``foo_bar`` is read from ``HOIDISTILL_FOO_BAR`` and set by ``--foo-bar``.
    """

    # --- model and engines -----------------------------------------------------------------
    model: str = _setting(
        "Salesforce/blip-itm-base-coco",
        "BLIP ITM model: a hub id or a local directory in the save_pretrained layout",
        _parse_str,
        _non_empty,
        "ID_OR_DIR",
    )
    model_revision: str | None = _setting(
        None,
        "hub revision (branch, tag or commit) of --model; unset = the default branch",
        _parse_optional_str,
        None,
        "REV",
    )
    device: tuple[str, ...] = _setting(
        ("auto",),
        "comma list of devices, one engine replica per device, all fed by one batcher "
        "(e.g. cuda:0,cuda:1); 'auto' = CUDA when present, else CPU",
        _parse_devices,
        _devices,
        "DEVICES",
    )
    dtype: str = _setting(
        "auto",
        f"engine dtype: {', '.join(DTYPES)} (auto = fp32 on CPU, bf16 on GPU)",
        _parse_str,
        _one_of(DTYPES),
        "DTYPE",
    )
    itm_start_token: str = _setting(
        "cls",
        "token that starts the ITM text: cls (as transformers) or enc (as original BLIP); "
        "part of the model fingerprint",
        _parse_str,
        _one_of(ITM_START_TOKENS),
        "TOKEN",
    )
    vision_cache_mb: float = _setting(
        512.0, "per-replica LRU of vision embeddings (MiB of device memory)", _parse_float, _at_least(0), "MIB"
    )
    text_batch_size: int = _setting(
        128, "sentences per text-side micro-batch inside one engine call", _parse_int, _at_least(1), "N"
    )

    # --- network ---------------------------------------------------------------------------
    host: str = _setting("0.0.0.0", "address both servers bind to", _parse_str, _non_empty, "HOST")
    grpc_port: int = _setting(50051, "gRPC port (native API, KServe v2, health, reflection)", _parse_int, _port, "PORT")
    http_port: int = _setting(8000, "HTTP port (JSON API, web page, /metrics)", _parse_int, _port, "PORT")

    # --- score cache -----------------------------------------------------------------------
    redis_url: str | None = _setting(
        None,
        "Redis for the shared score cache (redis://host:6379/0, rediss://..., unix://...); "
        "unset = in-process LRU cache",
        _parse_optional_str,
        _redis_url,
        "URL",
    )
    redis_cluster: bool = _setting(
        False, "--redis-url points at a Redis Cluster node (keys carry a hash tag per image)", _parse_bool, None, None
    )
    cache_ttl_s: int = _setting(
        7 * 24 * 3600, "lifetime of a cached image's scores in Redis (seconds)", _parse_int, _at_least(1), "SECONDS"
    )
    local_cache_entries: int = _setting(
        200_000,
        "entries (image, sentence) of the in-process LRU cache used when no Redis is set",
        _parse_int,
        _at_least(0),
        "N",
    )
    redis_timeout_s: float = _setting(
        0.5,
        "socket timeout of Redis commands; a dead Redis costs at most this per back-off window",
        _parse_float,
        _at_least(0.001),
        "SECONDS",
    )
    redis_backoff_s: float = _setting(
        1.0,
        "after a Redis failure, serve without the cache this long before probing again (doubles per failed probe)",
        _parse_float,
        _at_least(0.001),
        "SECONDS",
    )
    redis_backoff_max_s: float = _setting(
        30.0, "longest back-off between Redis probes during an outage", _parse_float, _at_least(0.001), "SECONDS"
    )

    # --- batching --------------------------------------------------------------------------
    max_batch_sentences: int = _setting(
        256, "most (image, sentence) pairs merged into one engine call", _parse_int, _at_least(1), "N"
    )
    max_delay_ms: float = _setting(
        5.0, "longest wait for more work before a partial batch runs (milliseconds)", _parse_float, _at_least(0), "MS"
    )
    max_queue: int = _setting(
        1024,
        "most queued work items (one image with its uncached sentences from one request) "
        "waiting for an engine; a request that does not fit gets RESOURCE_EXHAUSTED + retry hint",
        _parse_int,
        _at_least(1),
        "N",
    )
    drain_timeout_s: float = _setting(
        30.0, "on shutdown, how long queued and running work may finish", _parse_float, _at_least(0), "SECONDS"
    )

    # --- limits ----------------------------------------------------------------------------
    max_image_bytes: int = _setting(20 * MiB, "largest encoded image file (bytes)", _parse_int, _at_least(1), "BYTES")
    max_image_pixels: int = _setting(
        40_000_000,
        "largest decoded image (width x height pixels; guards decompression bombs)",
        _parse_int,
        _at_least(1),
        "PIXELS",
    )
    max_images_per_request: int = _setting(64, "most images (items) in one request", _parse_int, _at_least(1), "N")
    max_sentences_per_image: int = _setting(
        512, "most sentences per image in one request", _parse_int, _at_least(1), "N"
    )
    max_sentence_tokens: int = _setting(64, "longest sentence in tokenizer tokens", _parse_int, _at_least(1), "N")
    max_message_bytes: int = _setting(
        64 * MiB, "largest gRPC/HTTP message (bytes), both directions", _parse_int, _at_least(1024), "BYTES"
    )

    # --- security --------------------------------------------------------------------------
    tls_cert: str | None = _setting(
        None, "PEM certificate chain of the server; enables TLS", _parse_optional_str, None, "PATH"
    )
    tls_key: str | None = _setting(None, "PEM private key of --tls-cert", _parse_optional_str, None, "PATH")
    tls_client_ca: str | None = _setting(
        None,
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
        _parse_optional_str,
        None,
        "PATH",
    )
    auth_token: str | None = field(
        default=None,
        repr=False,  # never print the secret
        metadata={
            "help": "bearer token every request must carry (prefer the environment variable: "
            "flags show in the process list)",
            "parse": _parse_optional_str,
            "check": None,
            "metavar": "TOKEN",
        },
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            check = spec.metadata["check"]
            value = getattr(self, spec.name)
            if check is not None and value is not None:
                reason = check(value)
                if reason is not None:
                    raise SettingsError(f"setting {spec.name} ({_names(spec.name)}): {reason}")
        # One name per device (cuda -> cuda:0): the engines, metrics and model info agree on it.
        object.__setattr__(self, "device", tuple(canonical_device(device) for device in self.device))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError(
                f"TLS needs both tls_cert ({_names('tls_cert')}) and tls_key ({_names('tls_key')}); "
                f"only {'tls_cert' if self.tls_key is None else 'tls_key'} is set"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError(
                f"tls_client_ca ({_names('tls_client_ca')}) requires TLS: also set tls_cert and tls_key"
            )

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """Defaults overridden by ``HOIDISTILL_*`` variables of ``env`` (default ``os.environ``).

        Raises ``SettingsError`` naming the variable for a value that does not parse or is out of
        range, and for an unknown ``HOIDISTILL_*`` variable (a typo would otherwise be ignored).
        """
        return cls(**_values_from_env(os.environ if env is None else env))

    def public_dict(self) -> dict[str, Any]:
        """All settings as plain values, secrets replaced by ``"***"`` (for logs and model info)."""
        values = dataclasses.asdict(self)
        for name in _SECRET_FIELDS:
            if values[name] is not None:
                values[name] = "***"
        values["device"] = list(self.device)
        return values


def env_name(field_name: str) -> str:
    """``grpc_port`` -> ``HOIDISTILL_GRPC_PORT``."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """``grpc_port`` -> ``--grpc-port``."""
    return "--" + field_name.replace("_", "-")


def _names(field_name: str) -> str:
    return f"{flag_name(field_name)} / {env_name(field_name)}"


def _fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(ServerSettings)


def _parse(spec: dataclasses.Field, text: Any, source: str) -> Any:
    """Parse (when given text) and range-check one value, naming ``source`` on failure."""
    value = text
    if isinstance(text, str):
        try:
            value = spec.metadata["parse"](text)
        except ValueError as error:
            raise SettingsError(f"{source}: {error}") from None
    check = spec.metadata["check"]
    if check is not None and value is not None:
        reason = check(value)
        if reason is not None:
            raise SettingsError(f"{source}: {reason}")
    return value


def _values_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    by_env = {env_name(spec.name): spec for spec in _fields()}
    values: dict[str, Any] = {}
    for variable, text in env.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        spec = by_env.get(variable)
        if spec is None:
            close = difflib.get_close_matches(variable, by_env, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(by_env))}"
            raise SettingsError(f"unknown setting variable {variable}{hint}")
        values[spec.name] = _parse(spec, text, variable)
    return values


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (``--grpc-port``, ...) with help naming its variable and default.

    Flags default to "not given" so that ``settings_from_args`` can layer them over the
    environment; parse them with ``settings_from_args``.
    """
    group = parser.add_argument_group(
        "service settings", f"each flag overrides its {ENV_PREFIX}* variable, which overrides the default"
    )
    for spec in _fields():
        default = spec.default
        shown = "unset" if default is None else ",".join(default) if isinstance(default, tuple) else default
        if spec.name in _SECRET_FIELDS:
            shown = "unset"
        help_text = f"{spec.metadata['help']} [env {env_name(spec.name)}; default {shown}]"
        if isinstance(default, bool):
            # --redis-cluster / --no-redis-cluster: a flag can also switch off what env switched on.
            group.add_argument(
                flag_name(spec.name),
                dest=spec.name,
                default=argparse.SUPPRESS,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            group.add_argument(
                flag_name(spec.name),
                dest=spec.name,
                default=argparse.SUPPRESS,
                metavar=spec.metadata["metavar"],
                help=help_text,
            )


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerSettings:
    """Defaults, then ``HOIDISTILL_*`` variables of ``env`` (default ``os.environ``), then given flags."""
    values = _values_from_env(os.environ if env is None else env)
    for spec in _fields():
        if hasattr(args, spec.name):
            values[spec.name] = _parse(spec, getattr(args, spec.name), flag_name(spec.name))
    return ServerSettings(**values)
