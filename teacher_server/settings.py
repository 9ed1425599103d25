"""Settings of the teacher service: one typed object, validated by pydantic, from defaults, env and flags.

Precedence is ``flags > HOIDISTILL_* environment variables > defaults``. Every field has exactly
one environment variable (``HOIDISTILL_`` + the field name in upper case, read by pydantic-settings)
and one flag (``--`` + the field name with dashes, generated from the field list below), so the
three can never drift apart. Types, ranges and choices are declared on the fields; pydantic checks
them, and ``SettingsError`` turns its report into one line per problem that names where the value
came from (the flag, the variable, or the field with both) and the rule it broke.

Constructing ``ServerSettings(...)`` reads only what it is given; ``from_env`` and
``settings_from_args`` add the environment. This module does not import torch: the CLI's
``--help`` and config checks stay fast.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from teacher_server.errors import TeacherError

ENV_PREFIX = "HOIDISTILL_"
MiB = 1024 * 1024
Dtype = Literal["auto", "fp32", "bf16", "fp16"]
ItmStartToken = Literal["cls", "enc"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
DTYPES: tuple[str, ...] = get_args(Dtype)
ITM_START_TOKENS: tuple[str, ...] = get_args(ItmStartToken)
# 0 asks the OS for a free port (tests and side-by-side benches use it).
Port = Annotated[int, Field(ge=0, le=65535)]
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
_SECRET_FIELDS = frozenset({"auth_token"})
# Settings whose empty value means "unset" (compose files write HOIDISTILL_REDIS_URL=).
_OPTIONAL_TEXT = (
    "model_revision",
    "redis_url",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "auth_token",
    "auth_token_file",
    "redis_password_file",
)


class SettingsError(TeacherError, ValueError):
    """A setting has an invalid value; the message names the variable or flag and what is allowed."""


def canonical_device(name: str) -> str:
    """``cuda`` -> ``cuda:0`` and ``xpu`` -> ``xpu:0``; every other name as it is.

    torch's bare ``cuda`` is the process's current device, which the service never changes:
    device 0. Without this, ``cuda,cuda:0`` would load two engine copies onto one GPU.
    """
    return f"{name}:0" if name in ("cuda", "xpu") else name


def _setting(default: Any, description: str, metavar: str | None = None, **rules: Any) -> Any:
    """A field with its help text, the metavar of its flag and pydantic's rules (``ge``, ...)."""
    return Field(default, description=description, json_schema_extra={"metavar": metavar}, **rules)


class ServerSettings(BaseSettings):
    """Everything the teacher service can be told; safe defaults for a single-node run.

    Field ``foo_bar`` is read from ``HOIDISTILL_FOO_BAR`` and set by ``--foo-bar``.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # HOIDISTILL_TLS_CERT= means "unset", as compose files write it
        frozen=True,
        extra="forbid",
        str_strip_whitespace=True,
        validate_default=True,
    )

    # --- model and engines -----------------------------------------------------------------
    model: str = _setting(
        "Salesforce/blip-itm-base-coco",
        "BLIP ITM model: a hub id or a local directory in the save_pretrained layout",
        "ID_OR_DIR",
        min_length=1,
    )
    model_revision: str | None = _setting(
        None, "hub revision (branch, tag or commit) of --model; unset = the default branch", "REV"
    )
    # NoDecode: a comma list, not the JSON that pydantic-settings expects for a tuple by default.
    device: Annotated[tuple[str, ...], NoDecode] = _setting(
        ("auto",),
        "comma list of devices, one engine replica per device, all fed by one batcher "
        "(e.g. cuda:0,cuda:1); 'auto' = CUDA when present, else CPU",
        "DEVICES",
        min_length=1,
    )
    dtype: Dtype = _setting("auto", f"engine dtype: {', '.join(DTYPES)} (auto = fp32 on CPU, bf16 on GPU)", "DTYPE")
    itm_start_token: ItmStartToken = _setting(
        "cls",
        "token that starts the ITM text: cls (as transformers) or enc (as original BLIP); "
        "part of the model fingerprint",
        "TOKEN",
    )
    vision_cache_mb: float = _setting(512.0, "per-replica LRU of vision embeddings (MiB of device memory)", "MIB", ge=0)
    text_batch_size: int = _setting(128, "sentences per text-side micro-batch inside one engine call", "N", ge=1)
    region_policy: Literal["crop", "mask"] = _setting(
        "crop",
        "how an item's human-object region is shown to BLIP: crop (the union box, grown by "
        "--region-margin) or mask (the whole image, outside the two boxes dimmed by --region-dim); "
        "part of the model fingerprint",
        "POLICY",
    )
    region_margin: float = _setting(
        0.1, "crop policy: the union box grows by this fraction of its size on each side", "FRACTION", ge=0, le=2
    )
    region_dim: float = _setting(
        0.8, "mask policy: pixels outside both boxes are blended towards grey by this much", "FRACTION", ge=0, le=1
    )

    # --- network ---------------------------------------------------------------------------
    host: str = _setting("0.0.0.0", "address both servers bind to", "HOST", min_length=1)
    grpc_port: Port = _setting(50051, "gRPC port (native API, KServe v2, health, reflection)", "PORT")
    http_port: Port = _setting(8000, "HTTP port (JSON API, web page, /metrics)", "PORT")

    # --- score cache -----------------------------------------------------------------------
    redis_url: str | None = _setting(
        None,
        "Redis for the shared score cache (redis://host:6379/0, rediss://..., unix://...); "
        "unset = in-process LRU cache. A URL with a password (redis://user:pass@...) is a secret: "
        "refused as a flag, give it by the variable or use --redis-password-file",
        "URL",
        repr=False,  # it may hold a password
    )
    redis_cluster: bool = _setting(
        False, "--redis-url points at a Redis Cluster node (keys carry a hash tag per image)"
    )
    cache_ttl_s: int = _setting(
        7 * 24 * 3600, "lifetime of a cached image's scores in Redis (seconds)", "SECONDS", ge=1
    )
    local_cache_entries: int = _setting(
        200_000, "entries (image, sentence) of the in-process LRU cache used when no Redis is set", "N", ge=0
    )
    redis_timeout_s: float = _setting(
        0.5,
        "socket timeout of Redis commands; a dead Redis costs at most this per back-off window",
        "SECONDS",
        ge=0.001,
    )
    redis_backoff_s: float = _setting(
        1.0,
        "after a Redis failure, serve without the cache this long before probing again (doubles per failed probe)",
        "SECONDS",
        ge=0.001,
    )
    redis_backoff_max_s: float = _setting(
        30.0, "longest back-off between Redis probes during an outage", "SECONDS", ge=0.001
    )
    cache_refresh_ttl_on_read: bool = _setting(
        False,
        "a lookup also renews the looked-up images' TTL in Redis (one EXPIRE per image in the same "
        "round trip; a write on the primary per read: see docs/cache.md)",
    )

    # --- batching --------------------------------------------------------------------------
    max_batch_pairs: int = _setting(
        256,
        "most (image, sentence) pairs merged into one engine call; a burst is served in calls of at "
        "most this size (one image's work larger than it runs alone)",
        "N",
        ge=1,
    )
    max_batch_sentences: int = _setting(
        256, "former name of --max-batch-pairs (kept for old configurations; give one of the two)", "N", ge=1
    )
    max_batch_images: int = _setting(
        64, "most distinct image views (vision-encoder inputs) in one engine call", "N", ge=1
    )
    max_delay_ms: float = _setting(
        5.0, "longest wait for more work before a partial batch runs (milliseconds)", "MS", ge=0
    )
    max_queue: int = _setting(
        1024,
        "most queued work items (one image with its uncached sentences from one request) "
        "waiting for an engine; a request that does not fit gets RESOURCE_EXHAUSTED + retry hint",
        "N",
        ge=1,
    )
    max_queue_pairs: int = _setting(
        16384,
        "most (image, sentence) pairs admitted and not yet taken by an engine; past it, new cold work "
        "gets RESOURCE_EXHAUSTED / 429 + retry hint (cached answers never wait for it)",
        "N",
        ge=1,
    )
    max_queue_bytes: int = _setting(
        1024 * MiB,
        "most bytes of image data held by admitted work not yet taken by an engine: the files being "
        "decoded, then the prepared pixel tensors (3 x 384 x 384 float32 = 1.7 MiB per view for BLIP-base)",
        "BYTES",
        ge=1,
    )
    max_queue_wait_s: float = _setting(
        10.0,
        "most engine time the waiting work may need, at the measured speed, for new cold work to be "
        "admitted (0 = no bound by time); past it, or past the request's own deadline, new cold work "
        "gets RESOURCE_EXHAUSTED / 429 + retry hint at once instead of a timeout later",
        "SECONDS",
        ge=0,
    )
    drain_timeout_s: float = _setting(30.0, "on shutdown, how long queued and running work may finish", "SECONDS", ge=0)

    # --- limits ----------------------------------------------------------------------------
    max_image_bytes: int = _setting(20 * MiB, "largest encoded image file (bytes)", "BYTES", ge=1)
    max_image_pixels: int = _setting(
        40_000_000, "largest decoded image (width x height pixels; guards decompression bombs)", "PIXELS", ge=1
    )
    max_images_per_request: int = _setting(64, "most images (items) in one request", "N", ge=1)
    max_sentences_per_image: int = _setting(512, "most sentences per image in one request", "N", ge=1)
    max_sentence_tokens: int = _setting(64, "longest sentence in tokenizer tokens", "N", ge=1)
    max_message_bytes: int = _setting(64 * MiB, "largest gRPC/HTTP message (bytes), both directions", "BYTES", ge=1024)
    max_image_side: int = _setting(
        16_384,
        "longest accepted image side (pixels), checked from the header before decoding; with "
        "--max-image-aspect it refuses thin decompression bombs that pass the pixel limit",
        "PIXELS",
        ge=1,
    )
    max_image_aspect: float = _setting(
        20.0,
        "largest accepted ratio of an image's longer side to its shorter side, checked from the header",
        "RATIO",
        ge=1,
    )

    # --- evidence maps (POST /v1/explain) ------------------------------------------------------
    explain_layer: int | None = _setting(
        None,
        "text layer whose cross-attention the evidence maps read (0 = first, -1 = last); unset = "
        "the layer two thirds up the text tower (8 of 12 in BLIP-base, as BLIP's own Grad-CAM demo)",
        "LAYER",
    )
    explain_max_sentences: int = _setting(8, "most sentences in one evidence-map request", "N", ge=1)
    explain_concurrency: int = _setting(
        1, "evidence maps computed at once; a request beyond them gets 429 + retry hint", "N", ge=1
    )

    # --- security --------------------------------------------------------------------------
    tls_cert: str | None = _setting(None, "PEM certificate chain of the server; enables TLS", "PATH")
    tls_key: str | None = _setting(None, "PEM private key of --tls-cert", "PATH")
    tls_client_ca: str | None = _setting(
        None, "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)", "PATH"
    )
    auth_token: str | None = Field(
        None,
        repr=False,  # never print the secret
        description="bearer token every request must carry; only by the environment variable or "
        "--auth-token-file (refused as a flag: flags show in the process list)",
        json_schema_extra={"metavar": "TOKEN"},
    )
    auth_token_file: str | None = _setting(
        None,
        "file holding the bearer token (surrounding whitespace stripped); instead of HOIDISTILL_AUTH_TOKEN, "
        "e.g. a mounted Kubernetes or Docker secret",
        "PATH",
    )
    redis_password_file: str | None = _setting(
        None,
        "file holding the password of --redis-url's user (the URL then carries none; surrounding whitespace stripped)",
        "PATH",
    )

    # --- logging ---------------------------------------------------------------------------
    log_level: LogLevel = _setting("INFO", "least severe log records written: DEBUG, INFO, WARNING or ERROR", "LEVEL")
    log_format: LogFormat = _setting(
        "text",
        "log lines as text, or json for log collectors: one object per line (time, level, logger, "
        "message, extra fields)",
        "FORMAT",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructing reads only its arguments; the environment comes in through ``from_env``.

        A developer's ``HOIDISTILL_REDIS_URL`` must not leak into a test's ``ServerSettings(...)``.
        """
        return (init_settings,)

    def __init__(self, _sources: Mapping[str, str] | None = None, **values: Any) -> None:
        """Validate ``values``; ``SettingsError`` names the source of a bad value (see ``describe_errors``)."""
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(describe_errors(error, _sources)) from None

    # --- validation beyond the field rules ---------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, values: Any) -> Any:
        """``auth_token_file`` -> ``auth_token``; ``redis_password_file`` -> the password of ``redis_url``.

        The secrets then live where the rest of the service looks for them (and are hidden from
        ``repr`` and ``public_dict`` there); the file settings keep the paths.
        """
        if not isinstance(values, dict):
            return values
        values = dict(values)
        token_file = _given(values.get("auth_token_file"))
        if token_file is not None:
            if _given(values.get("auth_token")) is not None:
                raise ValueError(
                    f"set the bearer token once: auth_token ({env_name('auth_token')}) or auth_token_file "
                    f"({_names('auth_token_file')}), not both"
                )
            values["auth_token"] = _read_secret(token_file, "auth_token_file")
        password_file = _given(values.get("redis_password_file"))
        if password_file is not None:
            url = _given(values.get("redis_url"))
            if url is None:
                raise ValueError(f"redis_password_file ({_names('redis_password_file')}) needs redis_url as well")
            values["redis_url"] = _with_password(url, _read_secret(password_file, "redis_password_file"))
        return values

    @model_validator(mode="before")
    @classmethod
    def _batch_pairs_alias(cls, values: Any) -> Any:
        """``max_batch_sentences`` is the former name of ``max_batch_pairs``: either sets both."""
        if not isinstance(values, dict):
            return values
        new, old = values.get("max_batch_pairs"), values.get("max_batch_sentences")
        if new is not None and old is not None and str(new).strip() != str(old).strip():
            raise ValueError(
                f"max_batch_sentences ({_names('max_batch_sentences')}) is the former name of max_batch_pairs "
                f"({_names('max_batch_pairs')}); they disagree ({old} vs {new}): set only max_batch_pairs"
            )
        if new is None and old is not None:
            return {**values, "max_batch_pairs": old}
        if old is None and new is not None:
            return {**values, "max_batch_sentences": new}
        return values

    @field_validator(*_OPTIONAL_TEXT, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device", mode="before")
    @classmethod
    def _split_devices(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        devices = tuple(part.strip() for part in value.split(","))
        if any(not device for device in devices):
            raise ValueError(f"expected a comma-separated device list such as 'cuda:0,cuda:1', got {value!r}")
        return devices

    @field_validator("device")
    @classmethod
    def _check_devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [device for device in value if not _DEVICE_PATTERN.match(device)]
        if bad:
            raise ValueError(f"unknown device {bad[0]!r}: use auto, cpu, mps, cuda, cuda:N or xpu:N")
        canonical = tuple(canonical_device(device) for device in value)
        if len(set(canonical)) != len(canonical):
            aliases = sorted({f"{d} is {c}" for d, c in zip(value, canonical, strict=True) if d != c})
            raise ValueError(
                f"lists a device twice: {','.join(value)}" + (f" ({', '.join(aliases)})" if aliases else "")
            )
        if "auto" in value and len(value) > 1:
            raise ValueError("'auto' picks one device by itself and cannot be combined with others")
        # One name per device (cuda -> cuda:0): the engines, metrics and model info agree on it.
        return canonical

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {value.split('://')[0]!r}://...")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f"TLS needs both tls_cert ({_names('tls_cert')}) and tls_key ({_names('tls_key')}); "
                f"only {'tls_cert' if self.tls_key is None else 'tls_key'} is set"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(f"tls_client_ca ({_names('tls_client_ca')}) requires TLS: also set tls_cert and tls_key")
        return self

    # --- use -----------------------------------------------------------------------------------
    @property
    def tls_enabled(self) -> bool:
        """Whether both servers speak TLS."""
        return self.tls_cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """Defaults overridden by ``HOIDISTILL_*`` variables of ``env`` (default ``os.environ``).

        Raises ``SettingsError`` naming the variable for a value that does not parse or is out of
        range, and for an unknown ``HOIDISTILL_*`` variable (a typo would otherwise be ignored).
        """
        values = _values_from_env(os.environ if env is None else env)
        return cls(_sources={name: env_name(name) for name in values}, **values)

    def public_dict(self) -> dict[str, Any]:
        """All settings as plain (JSON) values, secrets replaced by ``"***"`` (for logs and model info)."""
        values = self.model_dump(mode="json")
        values.update({name: "***" for name in _SECRET_FIELDS if values[name] is not None})
        if self.redis_url is not None:
            from teacher_server.cache import redacted_url  # imports redis: only when needed

            values["redis_url"] = redacted_url(self.redis_url)
        return values


def env_name(field_name: str) -> str:
    """``grpc_port`` -> ``HOIDISTILL_GRPC_PORT``."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """``grpc_port`` -> ``--grpc-port``."""
    return "--" + field_name.replace("_", "-")


def _names(field_name: str) -> str:
    return f"{flag_name(field_name)} / {env_name(field_name)}"


# ---------------------------------------------------------------------------------- secrets
def _given(value: Any) -> Any:
    """``value``, or None for an unset or blank one (as ``_empty_is_unset`` treats it)."""
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _read_secret(path: str, setting: str) -> str:
    """The stripped text of a secret file, or a ValueError naming the setting and the path."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{setting} ({_names(setting)}): cannot read {path}: {reason}") from None
    if not text:
        raise ValueError(f"{setting} ({_names(setting)}): {path} is empty")
    return text


def _with_password(url: str, password: str) -> str:
    """``url`` with ``password`` for its user, percent-encoded in the authority (redis-py reads it
    there for every scheme, ``unix://:pw@/path/redis.sock`` too, and unquotes it)."""
    parts = urlsplit(url)
    if _has_password(url):
        raise ValueError(
            f"redis_url already carries a password; with redis_password_file ({_names('redis_password_file')}) "
            "give the URL without one (redis://user@host:6379/0)"
        )
    user, _, host = parts.netloc.rpartition("@")  # the user as written (already percent-encoded)
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _has_password(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or re.search(r"(^|&)password=", parts.query) is not None


def _flag_secrets(flags: Mapping[str, Any]) -> list[str]:
    """The secrets given as flags: refused, since every local user can read a command line."""
    refused = []
    if flags.get("auth_token"):
        refused.append(
            "--auth-token: refused: a token on the command line is readable by every local user "
            "(ps, /proc/<pid>/cmdline) for as long as the teacher runs; give it as HOIDISTILL_AUTH_TOKEN "
            "or in a file with --auth-token-file PATH"
        )
    url = flags.get("redis_url")
    if isinstance(url, str) and _has_password(url):
        refused.append(
            "--redis-url: refused: the URL carries a password, which the command line shows to every local "
            "user; give the URL as HOIDISTILL_REDIS_URL, or the password in a file with --redis-password-file PATH"
        )
    return refused


# ---------------------------------------------------------------------------------- the errors
def describe_errors(error: ValidationError, sources: Mapping[str, str] | None = None) -> str:
    """pydantic's report as one line per problem: where the value came from, and the rule.

    ``sources`` maps a field to the flag or variable that gave its value; a field not in it is
    named with both (``setting max_queue (--max-queue / HOIDISTILL_MAX_QUEUE)``).
    """
    lines = []
    for problem in error.errors():
        if problem["type"] == "value_error":  # our validators' own words, without "Value error, "
            reason = str(problem["ctx"]["error"])
        else:  # pydantic's message names the rule (the bound, the choices); add what was given
            reason = f"{problem['msg']}; got {problem['input']!r}"
        name = str(problem["loc"][0]) if problem["loc"] else None
        # No field: a rule across fields (the TLS pair), whose message names them.
        where = "settings" if name is None else (sources or {}).get(name, f"setting {name} ({_names(name)})")
        lines.append(f"{where}: {reason}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ environment and flags
class _EnvSource(EnvSettingsSource):
    """pydantic-settings' reading of ``HOIDISTILL_*`` variables, from a given mapping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(ServerSettings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # The source matches case-insensitively (its default), on lower-cased names.
        return {name.lower(): value for name, value in self._env.items()}


def _values_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    known = {env_name(name) for name in ServerSettings.model_fields}
    for variable in env:
        if variable.startswith(ENV_PREFIX) and variable not in known:
            close = difflib.get_close_matches(variable, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(known))}"
            raise SettingsError(f"unknown setting variable {variable}{hint}")
    return _EnvSource(env)()


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (``--grpc-port``, ...) with help naming its variable and default.

    Flags default to "not given" so that ``settings_from_args`` can layer them over the
    environment; parse them with ``settings_from_args``.
    """
    group = parser.add_argument_group(
        "service settings", f"each flag overrides its {ENV_PREFIX}* variable, which overrides the default"
    )
    for name, spec in ServerSettings.model_fields.items():
        shown = "unset" if spec.default is None or name in _SECRET_FIELDS else spec.default
        shown = ",".join(shown) if isinstance(shown, tuple) else shown
        help_text = f"{spec.description} [env {env_name(name)}; default {shown}]"
        # A bool is --redis-cluster / --no-redis-cluster: a flag can switch off what env switched on.
        extra = spec.json_schema_extra if isinstance(spec.json_schema_extra, dict) else {}
        how = (
            {"action": argparse.BooleanOptionalAction} if spec.annotation is bool else {"metavar": extra.get("metavar")}
        )
        group.add_argument(flag_name(name), dest=name, default=argparse.SUPPRESS, help=help_text, **how)


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerSettings:
    """Defaults, then ``HOIDISTILL_*`` variables of ``env`` (default ``os.environ``), then given flags."""
    values = _values_from_env(os.environ if env is None else env)
    sources = {name: env_name(name) for name in values}
    flags = {name: getattr(args, name) for name in ServerSettings.model_fields if hasattr(args, name)}
    refused = _flag_secrets(flags)
    if refused:
        raise SettingsError("\n".join(refused))
    values.update(flags)
    sources.update({name: flag_name(name) for name in flags})
    return ServerSettings(_sources=sources, **values)
