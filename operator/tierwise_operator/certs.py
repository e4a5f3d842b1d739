"""Self-managed webhook certificates: a CA and a serving certificate for the webhook's Service
names, when to renew them (well before expiry, so the API server never sees an expired one), and
the trust bundle that carries the previous CA across a rotation.

Why a bundle: the API server trusts what `caBundle` says, and the replicas switch to a new
certificate one by one; with both CAs trusted during the switch, no replica is ever refused.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE, CERT_FILE, KEY_FILE, TRUST_FILE = "ca.crt", "tls.crt", "tls.key", "ca-bundle.crt"
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class ServingCert:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    # What the webhook configurations trust: this CA, plus the previous one while it is valid.
    trust_pem: bytes = b""

    @property
    def trust(self) -> bytes:
        return self.trust_pem or self.ca_pem

    def files(self) -> dict[str, bytes]:
        return {CA_FILE: self.ca_pem, KEY_FILE: self.key_pem, CERT_FILE: self.cert_pem, TRUST_FILE: self.trust}

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            tmp = folder / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            # The key is readable by its owner only, from its first byte on.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name == KEY_FILE else 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            tmp.replace(folder / name)  # atomic: a reader never sees half a file

    @classmethod
    def read(cls, folder: Path) -> ServingCert | None:
        """The certificate written to `folder` earlier, if any."""
        try:
            data = {
                name: base64.b64encode((folder / name).read_bytes()).decode() for name in (CA_FILE, CERT_FILE, KEY_FILE)
            }
        except OSError:
            return None
        return cls.from_secret_data(data)

    def secret_data(self) -> dict[str, str]:
        return {k: base64.b64encode(v).decode() for k, v in self.files().items()}

    @staticmethod
    def expiry(cert_pem: bytes) -> datetime.datetime:
        return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> ServingCert | None:
        """The certificate a Secret holds, or None when it holds none (or a damaged one)."""
        try:
            raw = {k: base64.b64decode(v, validate=True) for k, v in (data or {}).items()}
            cert = cls(raw[CA_FILE], raw[CERT_FILE], raw[KEY_FILE], raw.get(TRUST_FILE, b""))
            parsed = x509.load_pem_x509_certificate(cert.cert_pem)
            key = serialization.load_pem_private_key(cert.key_pem, None)
            x509.load_pem_x509_certificates(cert.trust)
            parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except (KeyError, ValueError, TypeError, binascii.Error, x509.ExtensionNotFound):
            return None
        # A key that is not the certificate's would fail every TLS handshake: as good as none.
        if key.public_key().public_bytes(*_SPKI) != parsed.public_key().public_bytes(*_SPKI):
            return None
        return cert


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(hosts: list[str], now: datetime.datetime, valid: datetime.timedelta) -> ServingCert:
    """A fresh CA and a serving certificate for `hosts` (DNS names or IP addresses)."""
    # Valid a little before now, for clocks slightly behind ours; little enough not to move the
    # renewal point of a short-lived certificate.
    backdate = min(datetime.timedelta(minutes=5), valid / 10)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tierwise-webhook-ca"))
        .issuer_name(_name("tierwise-webhook-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + valid)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ServingCert(
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def renew_at(cert_pem: bytes) -> datetime.datetime:
    """When to replace a certificate: after two thirds of its lifetime."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * 2 / 3


def hosts_of(cert_pem: bytes) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in sans.get_values_for_type(x509.DNSName)} | {
        str(a) for a in sans.get_values_for_type(x509.IPAddress)
    }


def rotation_reason(current: ServingCert | None, hosts: list[str], now: datetime.datetime) -> str | None:
    """Why `current` must be replaced now, or None while it is good."""
    if current is None:
        return "no certificate yet"
    if not set(hosts) <= hosts_of(current.cert_pem):
        return "the webhook's names changed"
    if now >= renew_at(current.cert_pem):
        return "two thirds of its lifetime passed"
    return None


def _valid_at(ca_pem: bytes, now: datetime.datetime) -> bool:
    return x509.load_pem_x509_certificate(ca_pem).not_valid_after_utc > now


def rotate(
    current: ServingCert | None, hosts: list[str], now: datetime.datetime, valid: datetime.timedelta
) -> ServingCert:
    """A new CA and certificate, trusted together with the current CA while that is still valid.

    The new certificate also keeps the current one's names: replicas of two versions asking for
    different names (a rollout changing the cluster domain) settle instead of taking turns.
    """
    names = [*hosts, *sorted(hosts_of(current.cert_pem) - set(hosts))] if current is not None else hosts
    new = issue(names, now, valid)
    keep = current.ca_pem if current is not None and _valid_at(current.ca_pem, now) else b""
    return replace(new, trust_pem=new.ca_pem + keep)
