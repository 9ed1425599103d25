"""TLS and mutual TLS refusing what they must: a client trusting another CA, a client certificate
from another CA, expired server and client certificates; over gRPC and HTTP, real servers.

Each refusal is a failed handshake, and the server goes on serving good clients. What the client
is told differs by side: a client that refuses the server's certificate names the reason
(``CERTIFICATE_VERIFY_FAILED: certificate has expired`` / ``unable to get local issuer
certificate``); a client certificate the server refuses shows as a closed connection (TLS 1.3
finishes the client's handshake before the server judges its certificate, and neither gRPC's
BoringSSL nor Python's asyncio TLS sends the client an alert it could print). docs/security.md
lists these symptoms.
The happy paths and the token are in ``test_server_security.py`` and ``test_http_api.py``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from testkit.http import RunningHttp, b64, running_http
from testkit.teacher import (
    Certificates,
    RunningTeacher,
    make_certificates,
    png_bytes,
    running_teacher,
    teacher_settings,
)
from testkit.tls import KeyPair, expired_certificate

from teacher_server.client import TeacherClient, TeacherRpcError

torch.set_num_threads(1)

SENTENCES = ["a person ride a horse"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """Another CA with its own server and client certificates: valid, but not ours."""
    return make_certificates(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture(scope="module")
def expired_server(certs: Certificates) -> KeyPair:
    return expired_certificate(certs, "server")


@pytest.fixture(scope="module")
def expired_client(certs: Certificates) -> KeyPair:
    return expired_certificate(certs, "client")


def mutual_settings(model: Path, certs: Certificates, server: KeyPair | None = None):
    cert, key = (server.cert, server.key) if server else (certs.server_cert, certs.server_key)
    return teacher_settings(model, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(certs.ca))


# --------------------------------------------------------------------------------------- gRPC
@pytest.fixture(scope="module")
def grpc_teacher(tiny_blip_dir: Path, certs: Certificates) -> Iterator[RunningTeacher]:
    with running_teacher(mutual_settings(tiny_blip_dir, certs)) as running:
        yield running


def grpc_client(target: str, root: Path, pair: tuple[Path, Path] | None) -> TeacherClient:
    cert, key = pair if pair else (None, None)
    return TeacherClient(
        f"grpcs://{target}",
        root_certificates=root,
        client_cert=cert,
        client_key=key,
        max_retries=0,
        timeout_s=10,
        max_images_per_request=8,  # no GetModelInfo first: the Score call is the first RPC
    )


def grpc_refused(target: str, root: Path, pair: tuple[Path, Path] | None) -> TeacherRpcError:
    with grpc_client(target, root, pair) as client, pytest.raises(TeacherRpcError) as caught:
        client.score([png_bytes(1)], [SENTENCES])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE, caught.value
    return caught.value


def assert_grpc_serves(teacher: RunningTeacher, certs: Certificates) -> None:
    with grpc_client(teacher.target, certs.ca, (certs.client_cert, certs.client_key)) as client:
        assert len(client.score([png_bytes(2)], [SENTENCES])[0]) == 1


def test_grpc_client_trusting_another_ca_is_refused(grpc_teacher, certs, other):
    error = grpc_refused(grpc_teacher.target, other.ca, (certs.client_cert, certs.client_key))
    # The client checks the server's chain against the CA it trusts and stops the handshake.
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in error.details, error.details
    assert_grpc_serves(grpc_teacher, certs)


@pytest.mark.parametrize("which", ["another CA's client certificate", "an expired client certificate"])
def test_grpc_mutual_tls_refuses_bad_client_certificates(grpc_teacher, certs, other, expired_client, which):
    pair = (
        (other.client_cert, other.client_key)
        if which.startswith("another")
        else (expired_client.cert, expired_client.key)
    )
    error = grpc_refused(grpc_teacher.target, certs.ca, pair)
    # The server refuses the certificate; the client sees the connection it thought it had end.
    assert "Socket closed" in error.details, error.details
    assert_grpc_serves(grpc_teacher, certs)


def test_grpc_expired_server_certificate_is_refused_by_clients(tiny_blip_dir, certs, expired_server):
    with running_teacher(mutual_settings(tiny_blip_dir, certs, expired_server)) as teacher:
        error = grpc_refused(teacher.target, certs.ca, (certs.client_cert, certs.client_key))
        assert "CERTIFICATE_VERIFY_FAILED: certificate has expired" in error.details, error.details
        # Every client refuses it, every time (nothing is cached as trusted).
        again = grpc_refused(teacher.target, certs.ca, (certs.client_cert, certs.client_key))
        assert "certificate has expired" in again.details


# --------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def http_teacher(tiny_blip_dir: Path, certs: Certificates) -> Iterator[RunningHttp]:
    with running_http(mutual_settings(tiny_blip_dir, certs)) as running:
        yield running


def tls_context(root: Path, pair: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(root))
    if pair is not None:
        context.load_cert_chain(str(pair[0]), str(pair[1]))
    return context


def http_get(url: str, root: Path, pair: tuple[Path, Path] | None) -> httpx.Response:
    with httpx.Client(base_url=url, verify=tls_context(root, pair), timeout=10) as client:
        return client.get("/v1/model")


def assert_http_serves(teacher: RunningHttp, certs: Certificates) -> None:
    with httpx.Client(
        base_url=teacher.url, verify=tls_context(certs.ca, (certs.client_cert, certs.client_key)), timeout=60
    ) as client:
        response = client.post("/v1/score", json={"image": b64(png_bytes(3)), "sentences": SENTENCES})
    assert response.status_code == 200, response.text


def test_http_client_trusting_another_ca_is_refused(http_teacher, certs, other):
    with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED\] certificate verify failed"):
        http_get(http_teacher.url, other.ca, (certs.client_cert, certs.client_key))
    assert_http_serves(http_teacher, certs)


@pytest.mark.parametrize("which", ["another CA's client certificate", "an expired client certificate"])
def test_http_mutual_tls_refuses_bad_client_certificates(http_teacher, certs, other, expired_client, which):
    pair = (
        (other.client_cert, other.client_key)
        if which.startswith("another")
        else (expired_client.cert, expired_client.key)
    )
    # TLS 1.3: the client's handshake ends before the server has judged its certificate; the
    # server then closes the connection without a word (asyncio's TLS sends no alert).
    with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected without sending a response"):
        http_get(http_teacher.url, certs.ca, pair)
    assert_http_serves(http_teacher, certs)


def test_http_expired_server_certificate_is_refused_by_clients(tiny_blip_dir, certs, expired_server):
    with (
        running_http(mutual_settings(tiny_blip_dir, certs, expired_server)) as teacher,
        pytest.raises(
            httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED\] certificate verify failed: certificate has expired"
        ),
    ):
        http_get(teacher.url, certs.ca, (certs.client_cert, certs.client_key))
