"""A throwaway test PKI made with the ``openssl`` CLI: a CA (P-256) and a leaf for given DNS
names with SAN, serverAuth EKU and authority key identifier (what rustls/webpki and Python's
strict mode require)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    leaf_cert: Path
    leaf_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make(dir: Path, names: Sequence[str]) -> Pki:
    """Writes ``ca.pem``, ``leaf.pem`` and ``leaf.key`` into ``dir`` for ``names``."""
    ca_key, ca_cert = dir / "ca.key", dir / "ca.pem"
    leaf_key, leaf_csr, leaf_cert = dir / "leaf.key", dir / "leaf.csr", dir / "leaf.pem"
    ext = dir / "leaf.ext"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    _openssl(
        "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "2",
        "-subj", "/CN=sealgate python sdk test CA", "-out", str(ca_cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(leaf_key))
    _openssl("req", "-new", "-key", str(leaf_key), "-subj", f"/CN={names[0]}", "-out", str(leaf_csr))
    san = ",".join(f"DNS:{n}" for n in names)
    ext.write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", str(leaf_csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(leaf_cert),
    )
    return Pki(ca_cert=ca_cert, leaf_cert=leaf_cert, leaf_key=leaf_key)
