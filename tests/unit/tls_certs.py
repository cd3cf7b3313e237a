"""Test certificates: a CA and the certificates it signs, made on the spot
(EC P-256, valid for a day)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes

    def write(self, folder: Path, name: str) -> tuple[str, str]:
        """Write ``<name>.crt`` and ``<name>.key``; returns their paths."""
        crt, key = folder / f"{name}.crt", folder / f"{name}.key"
        crt.write_bytes(self.cert)
        key.write_bytes(self.key)
        return str(crt), str(key)


def _build(subject: str, public_key, issuer: str, signing_key, ca: bool,
           dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
         .public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns or ips:
        names = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(a))
                                                  for a in ips]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    def __init__(self, name: str = "splitserve-test-ca"):
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _build(name, self._key.public_key(), name, self._key, ca=True)

    def issue(self, name: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> Pem:
        """A certificate for ``name`` (also its DNS name) and these IPs, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        return Pem(_build(name, key.public_key(), self.name, self._key, ca=False,
                          dns=dns or (name,), ips=ips), _key_pem(key))
