"""Service settings: defaults, HOIDISTILL_* variables, flags, precedence and the errors they raise."""

from __future__ import annotations

import argparse

import pytest

from teacher_server.settings import (
    ServerSettings,
    SettingsError,
    add_server_arguments,
    env_name,
    flag_name,
    settings_from_args,
)

MiB = 1024 * 1024


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return settings_from_args(parser.parse_args(argv), env={} if env is None else env)


def test_defaults_are_the_documented_safe_values() -> None:
    settings = ServerSettings()
    assert settings.grpc_port == 50051 and settings.http_port == 8000 and settings.host == "0.0.0.0"
    assert settings.device == ("auto",) and settings.dtype == "auto" and settings.itm_start_token == "cls"
    assert settings.redis_url is None
    assert settings.cache_ttl_s == 7 * 24 * 3600 and settings.local_cache_entries == 200_000
    assert (settings.max_batch_sentences, settings.max_delay_ms, settings.max_queue) == (256, 5.0, 1024)
    assert settings.max_image_bytes == 20 * MiB and settings.max_image_pixels == 40_000_000
    assert settings.max_images_per_request == 64 and settings.max_sentences_per_image == 512
    assert settings.max_sentence_tokens == 64 and settings.max_message_bytes == 64 * MiB
    assert settings.tls_cert is settings.tls_key is settings.tls_client_ca is settings.auth_token is None
    assert not settings.tls_enabled


def test_from_env_reads_every_kind_of_value() -> None:
    settings = ServerSettings.from_env(
        {
            "HOIDISTILL_GRPC_PORT": "6000",
            "HOIDISTILL_MAX_DELAY_MS": "2.5",
            "HOIDISTILL_DEVICE": "cuda:0, cuda:1",
            "HOIDISTILL_REDIS_URL": "redis://cache:6379/1",
            "HOIDISTILL_REDIS_CLUSTER": "yes",
            "HOIDISTILL_TLS_CERT": "",  # empty = unset, as compose files write it
            "HOIDISTILL_MAX_IMAGE_BYTES": "1_000_000",
            "PATH": "/usr/bin",  # other variables are none of our business
        }
    )
    assert settings.grpc_port == 6000
    assert settings.max_delay_ms == 2.5
    assert settings.device == ("cuda:0", "cuda:1")
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.redis_cluster is True
    assert settings.tls_cert is None
    assert settings.max_image_bytes == 1_000_000


def test_cuda_and_cuda_0_are_one_device() -> None:
    # torch's "cuda" is the current device, cuda:0 in a process that never changed it: listing
    # both would load two engine copies onto one GPU.
    assert ServerSettings(device=("cuda",)).device == ("cuda:0",)
    assert parse(["--device", "cuda:1,xpu"]).device == ("cuda:1", "xpu:0")
    with pytest.raises(SettingsError, match=r"lists a device twice: cuda,cuda:0 \(cuda is cuda:0\)"):
        parse(["--device", "cuda,cuda:0"])
    with pytest.raises(SettingsError, match="lists a device twice"):
        ServerSettings(device=("cuda:0", "cuda"))


def test_flags_override_env_which_overrides_defaults() -> None:
    env = {"HOIDISTILL_GRPC_PORT": "6000", "HOIDISTILL_HTTP_PORT": "6001", "HOIDISTILL_REDIS_CLUSTER": "1"}
    settings = parse(["--grpc-port", "7000", "--no-redis-cluster", "--device", "cpu"], env)
    assert settings.grpc_port == 7000  # flag beats env
    assert settings.http_port == 6001  # env beats default
    assert settings.redis_cluster is False  # a flag can switch off what env switched on
    assert settings.device == ("cpu",)
    assert settings.max_queue == 1024  # neither: default


def test_every_setting_has_a_flag_and_variable_documented_in_help() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
    for name, spec in ServerSettings.model_fields.items():
        assert flag_name(name) in text, name
        assert env_name(name) in text, name
        assert spec.description, f"{name} has no help text"
    assert "default 50051" in text


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("HOIDISTILL_GRPC_PORT", "fifty", "valid integer"),
        ("HOIDISTILL_GRPC_PORT", "70000", "less than or equal to 65535"),
        ("HOIDISTILL_DTYPE", "fp64", "'auto', 'fp32', 'bf16' or 'fp16'"),
        ("HOIDISTILL_ITM_START_TOKEN", "sep", "'cls' or 'enc'"),
        ("HOIDISTILL_MAX_QUEUE", "0", "greater than or equal to 1"),
        ("HOIDISTILL_MAX_DELAY_MS", "soon", "valid number"),
        ("HOIDISTILL_DEVICE", "cuda:0,,cpu", "comma-separated"),
        ("HOIDISTILL_DEVICE", "gpu0", "unknown device 'gpu0'"),
        ("HOIDISTILL_DEVICE", "cpu,cpu", "twice"),
        ("HOIDISTILL_DEVICE", "auto,cuda:1", "cannot be combined"),
        ("HOIDISTILL_REDIS_URL", "http://cache:6379", "redis://"),
        ("HOIDISTILL_REDIS_CLUSTER", "maybe", "valid boolean"),
    ],
)
def test_invalid_env_value_names_the_variable_and_the_rule(variable: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        ServerSettings.from_env({variable: value})
    assert variable in str(caught.value)
    assert expected in str(caught.value)


def test_unknown_variable_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(SettingsError, match=r"HOIDISTILL_REDIS_ULR.*did you mean HOIDISTILL_REDIS_URL"):
        ServerSettings.from_env({"HOIDISTILL_REDIS_ULR": "redis://x"})


def test_invalid_flag_value_names_the_flag() -> None:
    with pytest.raises(SettingsError, match="--max-batch-sentences: Input should be greater than or equal to 1"):
        parse(["--max-batch-sentences", "0"])
    with pytest.raises(SettingsError, match=r"--http-port: Input should be a valid integer.*got 'eighty'"):
        parse(["--http-port", "eighty"])


def test_construction_reads_only_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment enters through from_env / settings_from_args only: a developer's exported
    # variable must not change what a test or a bench constructs.
    monkeypatch.setenv("HOIDISTILL_GRPC_PORT", "6000")
    assert ServerSettings().grpc_port == 50051
    assert ServerSettings.from_env().grpc_port == 6000
    assert settings_from_args(argparse.Namespace()).grpc_port == 6000  # os.environ by default


def test_every_bad_value_is_reported_and_settings_are_frozen() -> None:
    with pytest.raises(SettingsError) as caught:
        ServerSettings.from_env({"HOIDISTILL_GRPC_PORT": "fifty", "HOIDISTILL_MAX_QUEUE": "0"})
    assert str(caught.value).splitlines() == [
        "HOIDISTILL_GRPC_PORT: Input should be a valid integer, unable to parse string as an integer; got 'fifty'",
        "HOIDISTILL_MAX_QUEUE: Input should be greater than or equal to 1; got '0'",
    ]
    with pytest.raises(SettingsError, match=r"grpc_prot .*Extra inputs are not permitted"):
        ServerSettings(grpc_prot=1)
    settings = ServerSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.grpc_port = 1  # type: ignore[misc]


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(SettingsError, match=r"max_sentence_tokens \(--max-sentence-tokens / HOIDISTILL_"):
        ServerSettings(max_sentence_tokens=0)


def test_tls_settings_must_come_together() -> None:
    with pytest.raises(SettingsError, match=r"both tls_cert .* and tls_key .*only tls_cert is set"):
        ServerSettings(tls_cert="server.pem")
    with pytest.raises(SettingsError, match=r"tls_client_ca .* requires TLS"):
        ServerSettings(tls_client_ca="ca.pem")
    settings = ServerSettings(tls_cert="server.pem", tls_key="server.key", tls_client_ca="ca.pem")
    assert settings.tls_enabled


def test_auth_token_never_printed() -> None:
    settings = parse([], env={"HOIDISTILL_AUTH_TOKEN": "s3cret"})  # as a flag it is refused: test_secrets.py
    assert settings.auth_token == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.public_dict()["auth_token"] == "***"
    assert ServerSettings().public_dict()["auth_token"] is None
