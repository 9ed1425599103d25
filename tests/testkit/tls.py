"""Certificates that must be refused: expired ones signed by a ``make_certificates`` CA.

Another CA altogether is just a second ``make_certificates`` (``testkit.teacher``). The
``cryptography`` package is not installed, so these come from the ``openssl`` CLI as well:
``openssl ca`` is the one that can back-date a certificate (``x509 -req`` only counts days from
now).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testkit.teacher import Certificates, _openssl

# Valid for one day, six years before these tests were written: expired for any clock.
EXPIRED_FROM, EXPIRED_UNTIL = "20200101000000Z", "20200102000000Z"
_USES = {"server": ("serverAuth", "DNS:localhost,IP:127.0.0.1"), "client": ("clientAuth", "DNS:trainer")}


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def expired_certificate(certs: Certificates, kind: str) -> KeyPair:
    """A ``kind`` ("server" or "client") certificate signed by ``certs``' CA that expired in 2020.

    Everything else (names, key usage) is as the valid one, so expiry is the only fault.
    """
    usage, alt_names = _USES[kind]
    directory = certs.ca.parent / f"expired-{kind}"
    directory.mkdir(exist_ok=True)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("1000\n")
    (directory / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n"
        "[test]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\ndefault_md = sha256\n"
        "policy = any\nunique_subject = no\n"
        "[any]\ncommonName = supplied\n"
    )
    (directory / "ext").write_text(f"subjectAltName={alt_names}\nextendedKeyUsage={usage}\n")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *curve, "-keyout", "key.pem", "-out", "req.csr", "-subj", f"/CN={kind}", cwd=directory)
    _openssl(
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-cert",
        str(certs.ca),
        "-keyfile",
        str(certs.ca.parent / "ca.key"),
        "-in",
        "req.csr",
        "-out",
        "cert.pem",
        "-startdate",
        EXPIRED_FROM,
        "-enddate",
        EXPIRED_UNTIL,
        "-extfile",
        "ext",
        "-notext",
        cwd=directory,
    )
    return KeyPair(directory / "cert.pem", directory / "key.pem")
