"""Secrets reach the teacher by environment variable or file, never by flag.

A command line is readable by every local user (``ps``, ``/proc/<pid>/cmdline``) for as long as the
process runs, so ``--auth-token`` and a ``--redis-url`` carrying a password are refused with a
message naming what to use instead; ``HOIDISTILL_AUTH_TOKEN`` / ``--auth-token-file`` and
``HOIDISTILL_REDIS_URL`` / ``--redis-password-file`` carry them. Secrets never print.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from testkit import REPO
from testkit.processes import clean_env

from teacher_server.settings import ServerSettings, SettingsError, add_server_arguments, settings_from_args

TOKEN = "tok-0c5e1f9b7a2d"
PASSWORD = "p@ss:w/rd 9"  # characters a URL must percent-encode


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return settings_from_args(parser.parse_args(argv), env={} if env is None else env)


def secret_file(tmp_path: Path, text: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


# ---------------------------------------------------------------------------------- the token
def test_token_as_a_flag_is_refused_naming_the_alternatives() -> None:
    with pytest.raises(SettingsError) as caught:
        parse(["--auth-token", TOKEN])
    message = str(caught.value)
    assert "--auth-token: refused" in message and "ps, /proc/<pid>/cmdline" in message
    assert "HOIDISTILL_AUTH_TOKEN" in message and "--auth-token-file" in message
    assert TOKEN not in message


def test_token_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert parse([], env={"HOIDISTILL_AUTH_TOKEN": TOKEN}).auth_token == TOKEN
    path = secret_file(tmp_path, TOKEN + "\n")  # `echo token > file` adds a newline: stripped
    for settings in (
        parse(["--auth-token-file", path]),
        parse([], env={"HOIDISTILL_AUTH_TOKEN_FILE": path}),
        ServerSettings(auth_token_file=path),
    ):
        assert settings.auth_token == TOKEN and settings.auth_token_file == path
        assert TOKEN not in repr(settings) and settings.public_dict()["auth_token"] == "***"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"auth_token_file \(--auth-token-file / HOIDISTILL_AUTH_TOKEN_FILE\): cannot read .*missing"),
        ("  \n", "is empty"),
    ],
)
def test_unreadable_or_empty_token_file_names_the_setting(tmp_path: Path, content: str | None, expected: str) -> None:
    path = str(tmp_path / "missing") if content is None else secret_file(tmp_path, content)
    with pytest.raises(SettingsError, match=expected):
        parse(["--auth-token-file", path])


def test_token_and_token_file_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="set the bearer token once"):
        parse(["--auth-token-file", secret_file(tmp_path, TOKEN)], env={"HOIDISTILL_AUTH_TOKEN": "other"})


def test_serve_refuses_a_token_flag_before_loading_anything() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "teacher_server", "serve", "--model", "/nonexistent", "--auth-token", TOKEN],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--auth-token: refused" in done.stderr and "HOIDISTILL_AUTH_TOKEN" in done.stderr


# ------------------------------------------------------------------------------ Redis password
def test_redis_url_with_a_password_as_a_flag_is_refused() -> None:
    for url in ("redis://alice:pw@redis:6379/0", "redis://:pw@redis:6379/0", "unix:///run/redis.sock?password=pw"):
        with pytest.raises(SettingsError, match="--redis-url: refused: the URL carries a password"):
            parse(["--redis-url", url])
    assert parse(["--redis-url", "redis://alice@redis:6379/0"]).redis_url == "redis://alice@redis:6379/0"
    from_env = parse([], env={"HOIDISTILL_REDIS_URL": "redis://alice:pw@redis:6379/0"})
    assert from_env.redis_url == "redis://alice:pw@redis:6379/0"
    assert "pw" not in repr(from_env) and from_env.public_dict()["redis_url"] == "redis://alice:***@redis:6379/0"


def test_redis_password_file_joins_the_url_percent_encoded(tmp_path: Path) -> None:
    path = secret_file(tmp_path, PASSWORD + "\n")
    settings = parse(["--redis-url", "rediss://alice@redis:6380/2", "--redis-password-file", path])
    assert settings.redis_url == "rediss://alice:p%40ss%3Aw%2Frd%209@redis:6380/2"
    # redis-py reads back exactly the password in the file.
    options = redis.connection.parse_url(settings.redis_url)
    assert (options["username"], options["password"], options["host"], options["port"]) == (
        "alice",
        PASSWORD,
        "redis",
        6380,
    )
    assert options["connection_class"] is redis.SSLConnection
    assert PASSWORD not in repr(settings) and "p%40ss" not in str(settings.public_dict())
    default_user = parse(["--redis-url", "redis://redis:6379/0", "--redis-password-file", path])
    assert redis.connection.parse_url(default_user.redis_url)["password"] == PASSWORD


def test_redis_password_file_needs_a_url_without_a_password(tmp_path: Path) -> None:
    path = secret_file(tmp_path, PASSWORD)
    with pytest.raises(SettingsError, match=r"redis_password_file .* needs redis_url"):
        parse(["--redis-password-file", path])
    with pytest.raises(SettingsError, match="redis_url already carries a password"):
        parse(["--redis-password-file", path], env={"HOIDISTILL_REDIS_URL": "redis://a:b@redis:6379/0"})
