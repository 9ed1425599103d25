"""TLS, mutual TLS and the bearer token, with real certificates and real clients."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from testkit.teacher import (
    Certificates,
    RunningTeacher,
    make_certificates,
    png_bytes,
    running_teacher,
    teacher_settings,
)
from tritonclient.utils import InferenceServerException

from teacher_server import grpc_api
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.auth import AuthConfigError, BearerTokenInterceptor, bearer_token, read_pem, server_credentials
from teacher_server.client import TeacherClient, TeacherRpcError

torch.set_num_threads(1)

TOKEN = "s3cret-token"
SENTENCES = ["a person ride a horse"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_teacher(tiny_blip_dir: Path, certs: Certificates) -> Iterator[RunningTeacher]:
    """TLS (server certificate only) and a required bearer token."""
    settings = teacher_settings(
        tiny_blip_dir, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), auth_token=TOKEN
    )
    with running_teacher(settings) as running:
        yield running


def tls_client(teacher: RunningTeacher, certs: Certificates, **kwargs) -> TeacherClient:
    # max_images_per_request given: score() goes straight to Score (no GetModelInfo first).
    return TeacherClient(f"grpcs://{teacher.target}", root_certificates=certs.ca, max_images_per_request=8, **kwargs)


def assert_serving(teacher: RunningTeacher, certs: Certificates) -> None:
    with tls_client(teacher, certs, token=TOKEN) as client:
        assert len(client.score([png_bytes(999)], [SENTENCES])[0]) == 1


def unauthenticated_count(teacher: RunningTeacher) -> float:
    return teacher.metric(
        "hoidistill_teacher_errors_total", {"method": f"{grpc_api.SERVICE_NAME}/Score", "code": "UNAUTHENTICATED"}
    )


# ---------------------------------------------------------------------------------------- TLS
def test_tls_client_with_token_scores(tls_teacher, certs):
    with tls_client(tls_teacher, certs, token=TOKEN) as client:
        scores = client.score([png_bytes(1)], [SENTENCES])
        info = client.model_info()
    assert len(scores[0]) == 1 and 0.0 <= scores[0][0].match_prob <= 1.0
    assert info.fingerprint == tls_teacher.service.fingerprint


def test_plain_text_client_against_tls_server_fails_unavailable(tls_teacher, certs):
    plain = TeacherClient(f"grpc://{tls_teacher.target}", token=TOKEN, max_retries=0, timeout_s=10)
    with plain, pytest.raises(TeacherRpcError) as caught:
        plain.score([png_bytes(2)], [SENTENCES])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert_serving(tls_teacher, certs)


def test_client_trusting_another_ca_fails(tls_teacher, certs):
    # The server's own certificate is not a CA: nothing it signs... and it did not sign itself.
    with (
        TeacherClient(
            f"grpcs://{tls_teacher.target}",
            root_certificates=certs.client_cert,
            token=TOKEN,
            max_retries=0,
            timeout_s=10,
        ) as client,
        pytest.raises(TeacherRpcError) as caught,
    ):
        client.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert_serving(tls_teacher, certs)


# -------------------------------------------------------------------------------------- token
def test_missing_token_is_unauthenticated(tls_teacher, certs):
    before = unauthenticated_count(tls_teacher)
    with tls_client(tls_teacher, certs) as client, pytest.raises(TeacherRpcError) as caught:
        client.score([png_bytes(3)], [SENTENCES])
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in caught.value.details and "authorization: Bearer" in caught.value.details
    deadline = time.monotonic() + 10
    while unauthenticated_count(tls_teacher) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert unauthenticated_count(tls_teacher) == before + 1
    assert_serving(tls_teacher, certs)


def test_wrong_token_is_unauthenticated(tls_teacher, certs):
    with tls_client(tls_teacher, certs, token="guess") as client, pytest.raises(TeacherRpcError) as caught:
        client.model_info()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid bearer token" in caught.value.details
    assert_serving(tls_teacher, certs)


def test_stream_without_token_is_unauthenticated(tls_teacher, certs):
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with grpc.secure_channel(tls_teacher.target, credentials) as channel:
        responses = pb_grpc.TeacherServiceStub(channel).ScoreStream(iter([pb.ScoreRequest(request_id="x")]), timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            list(responses)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(tls_teacher, certs):
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with grpc.secure_channel(tls_teacher.target, credentials) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_kserve_liveness_and_readiness_need_no_token_but_model_calls_do(tls_teacher, certs):
    # Kubernetes probes (and tritonclient's is_server_live / is_server_ready) send no metadata.
    client = triton.InferenceServerClient(url=tls_teacher.target, ssl=True, root_certificates=str(certs.ca))
    try:
        assert client.is_server_live() and client.is_server_ready()
        with pytest.raises(InferenceServerException) as caught:
            client.is_model_ready("blip_itm")
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    finally:
        client.close()


def test_tritonclient_with_tls_and_token_header(tls_teacher, certs):
    def infer(headers: dict[str, str] | None):
        client = triton.InferenceServerClient(url=tls_teacher.target, ssl=True, root_certificates=str(certs.ca))
        try:
            image = triton.InferInput("IMAGE", [1], "BYTES")
            image.set_data_from_numpy(np.array([png_bytes(4)], dtype=np.object_))
            text = triton.InferInput("TEXT", [1], "BYTES")
            text.set_data_from_numpy(np.array([b"a person ride a horse"], dtype=np.object_))
            return client.infer("blip_itm", [image, text], headers=headers)
        finally:
            client.close()

    result = infer({"authorization": f"Bearer {TOKEN}"})
    assert result.as_numpy("MATCH_PROB").shape == (1,)
    with pytest.raises(InferenceServerException) as caught:
        infer(None)
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"


def test_tokens_are_never_logged(tls_teacher, certs, caplog, capfd):
    right, wrong = TOKEN, "guess-7d2f41c0b9e3"
    with caplog.at_level(logging.DEBUG):  # every logger of the process, the server's included
        with tls_client(tls_teacher, certs, token=wrong) as client, pytest.raises(TeacherRpcError):
            client.score([png_bytes(6)], [SENTENCES])
        assert_serving(tls_teacher, certs)  # the right token
        client = triton.InferenceServerClient(url=tls_teacher.target, ssl=True, root_certificates=str(certs.ca))
        try:
            with pytest.raises(InferenceServerException):
                client.get_model_metadata("blip_itm", headers={"authorization": f"Bearer {wrong}"})
            assert client.get_model_metadata("blip_itm", headers={"authorization": f"Bearer {right}"}).name
        finally:
            client.close()
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    captured = capfd.readouterr()  # and what went to the process's stdout/stderr (gRPC's C core)
    for token in (right, wrong):
        assert token not in logged and token not in captured.out + captured.err


# --------------------------------------------------------------------------------- mutual TLS
def test_mutual_tls_requires_a_client_certificate(tiny_blip_dir, certs):
    settings = teacher_settings(
        tiny_blip_dir, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_client_ca=str(certs.ca)
    )
    with running_teacher(settings) as teacher:
        with (
            TeacherClient(
                f"grpcs://{teacher.target}", root_certificates=certs.ca, max_retries=0, timeout_s=10
            ) as anonymous,
            pytest.raises(TeacherRpcError) as caught,
        ):
            anonymous.score([png_bytes(5)], [SENTENCES])
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE

        with TeacherClient(
            teacher.target, root_certificates=certs.ca, client_cert=certs.client_cert, client_key=certs.client_key
        ) as client:
            scores = client.score([png_bytes(5)], [SENTENCES])
        assert len(scores[0]) == 1


# ------------------------------------------------------------------------------------ helpers
def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("user-agent", "x"), ("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


def test_configuration_errors_name_the_setting(tmp_path, certs):
    with pytest.raises(AuthConfigError, match="auth_token"):
        BearerTokenInterceptor("")
    with pytest.raises(AuthConfigError, match="tls_key"):
        server_credentials(certs.server_cert, None)
    with pytest.raises(AuthConfigError, match="tls_client_ca: mutual TLS needs tls_cert"):
        server_credentials(None, None, certs.ca)
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(AuthConfigError, match=r"tls_cert: .*cert\.txt is not a PEM file"):
        read_pem(not_pem, "tls_cert")
    with pytest.raises(AuthConfigError, match="tls_key: cannot read"):
        read_pem(tmp_path / "missing.key", "tls_key")
    assert server_credentials(None, None) is None
    assert server_credentials(certs.server_cert, certs.server_key, certs.ca) is not None
