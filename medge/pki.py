"""A site's device identity: two small CAs, CSR signing, revocation and the broker's CRLs.

Why two CAs: the hospital broker maps a client certificate's CN to the MQTT username
(``use_identity_as_username``), and *any* certificate its ``cafile`` trusts is accepted on that
listener. Devices and operators therefore get separate CAs, each trusted by its own listener,
so a device certificate can never log in with an operator's rights (docs/security.md).

Private keys are made where they are used (``create_request`` on the device) and never leave it:
the CA only ever sees certificate signing requests. Every private key file is mode 0600.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medge.config import Secret
from medge.settings import check_topic_level

Role = Literal["device", "operator", "server"]
ROLES: tuple[Role, ...] = ("device", "operator", "server")
CA_OF_ROLE: dict[Role, str] = {"device": "device-ca", "operator": "operator-ca",
                               "server": "device-ca"}
"""Broker certificates come from the device CA: the one trust anchor every client is given."""

DEFAULT_DAYS: dict[Role, int] = {"device": 365, "operator": 90, "server": 365}
"""Short operator lifetimes: people change roles more often than boxes are replaced."""
CA_DAYS = 3650
MAX_DAYS = 3650
CRL_DAYS = 30
"""A CRL past its nextUpdate makes OpenSSL refuse every client: re-sign it well before."""
MIN_RSA_BITS = 2048


class PkiError(Exception):
    """A PKI operation was refused; the message names the file or name and the reason."""


@dataclass(frozen=True)
class Issued:
    """One certificate the CA signed, as kept in its ``issued.json`` register."""

    serial: int
    name: str
    role: str
    not_after: str
    revoked_at: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never briefly world-readable)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"{path}: exists; refusing to overwrite a private key") from None
    except OSError as exc:
        raise PkiError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """Load a PEM key, refusing one readable by group/other (as config secrets are)."""
    try:
        pem = Secret.read(path).value.encode()
    except ValueError as exc:
        raise PkiError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path}: only EC and RSA keys are supported")
    return key


def check_name(name: str) -> None:
    """Names become MQTT usernames and topic levels (a broker's host name fits the same rule)."""
    try:
        check_topic_level("name", name)
    except ValueError as exc:
        raise PkiError(str(exc)) from None


def _valid_for(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    """A fresh serial and a validity from a few minutes ago (clock skew) for ``days``."""
    now = _now()
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days)))


def _subject_alt_names(entries: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for entry in entries:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    return names


def create_request(name: str, key_path: Path, san: tuple[str, ...] = ()) -> bytes:
    """A CSR for ``name``; the key is created at ``key_path`` (0600) unless it already exists.

    Reusing an existing key lets a device renew its certificate without a new identity.
    """
    check_name(name)
    if key_path.exists():
        key = load_private_key(key_path)
    else:
        new_key = _new_key()
        write_private(key_path, _key_pem(new_key))
        key = new_key
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(_subject_alt_names(san)),
                                        critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """One CA directory: ``ca.key`` (0600), ``ca.crt``, ``crl.pem`` and ``issued.json``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            self.certificate = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError:
            raise PkiError(f"{directory}: no CA here (run `medge pki init`)") from None
        except ValueError as exc:
            raise PkiError(f"{self.cert_path}: not a PEM certificate ({exc})") from None
        self._key = load_private_key(directory / "ca.key")

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def register_path(self) -> Path:
        return self.directory / "issued.json"

    @classmethod
    def create(cls, directory: Path, common_name: str, days: int = CA_DAYS) -> CertificateAuthority:
        """Make a new self-signed CA with an empty CRL; refuse to replace an existing one."""
        if (directory / "ca.key").exists():
            raise PkiError(f"{directory}: a CA exists already; refusing to replace it")
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)  # the broker reads the CRL; the key itself is 0600
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = (
            _valid_for(x509.CertificateBuilder(), days)
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(directory / "ca.key", _key_pem(key))
        _write_public(directory / "ca.crt", certificate.public_bytes(serialization.Encoding.PEM))
        _write_public(directory / "issued.json", b"[]\n")
        ca = cls(directory)
        ca.write_crl()
        return ca

    def register(self) -> list[Issued]:
        try:
            return [Issued(**entry) for entry in json.loads(self.register_path.read_text())]
        except (OSError, ValueError, TypeError) as exc:
            raise PkiError(f"{self.register_path}: unreadable register ({exc})") from None

    def _save_register(self, entries: list[Issued]) -> None:
        _write_public(self.register_path,
                      (json.dumps([asdict(e) for e in entries], indent=1) + "\n").encode())

    def issue(self, csr_pem: bytes, name: str, role: Role, days: int | None = None) -> bytes:
        """Sign a CSR whose CN is ``name``; return the certificate as PEM."""
        check_name(name)
        days = DEFAULT_DAYS[role] if days is None else days
        if not 1 <= days <= MAX_DAYS:
            raise PkiError(f"days must be 1..{MAX_DAYS}, got {days}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise PkiError("the CSR's signature does not verify")
        common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [a.value for a in common_names] != [name]:
            raise PkiError(f"the CSR is for {[a.value for a in common_names]}, not {name!r}")
        public_key = csr.public_key()
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
            raise PkiError(f"RSA key of {public_key.key_size} bits; at least {MIN_RSA_BITS}")
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise PkiError("only EC and RSA keys are supported")
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" \
            else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _valid_for(x509.CertificateBuilder(), days)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject).public_key(public_key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            builder = builder.add_extension(san.value, critical=False)
        except x509.ExtensionNotFound:
            pass
        certificate = builder.sign(self._key, hashes.SHA256())
        entries = self.register()
        entries.append(Issued(certificate.serial_number, name, role,
                              certificate.not_valid_after_utc.isoformat()))
        self._save_register(entries)
        return certificate.public_bytes(serialization.Encoding.PEM)

    def revoke(self, name: str) -> list[int]:
        """Revoke every unrevoked certificate issued to ``name`` and re-sign the CRL."""
        entries = self.register()
        revoked: list[int] = []
        stamp = _now().isoformat()
        for index, entry in enumerate(entries):
            if entry.name == name and entry.revoked_at is None:
                entries[index] = Issued(entry.serial, entry.name, entry.role, entry.not_after,
                                        stamp)
                revoked.append(entry.serial)
        if not revoked:
            raise PkiError(f"{self.directory}: no unrevoked certificate issued to {name!r}")
        self._save_register(entries)
        self.write_crl()
        return revoked

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        """Sign a fresh CRL listing every revoked certificate (run daily: see operations.md)."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.certificate.subject)
                   .last_update(now - timedelta(minutes=5)).next_update(now + timedelta(days=days)))
        for entry in self.register():
            if entry.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(entry.serial)
                    .revocation_date(datetime.fromisoformat(entry.revoked_at)).build())
        crl = builder.sign(self._key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path


class SitePki:
    """A site's PKI directory: ``device-ca/`` and ``operator-ca/``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def init(self, site: str, days: int = CA_DAYS) -> None:
        check_name(site)
        for ca_name in sorted(set(CA_OF_ROLE.values())):
            CertificateAuthority.create(self.directory / ca_name, f"medge {site} {ca_name}", days)

    def ca(self, role: Role) -> CertificateAuthority:
        return CertificateAuthority(self.directory / CA_OF_ROLE[role])

    def refresh_crls(self) -> list[Path]:
        return [self.ca(role).write_crl() for role in ("device", "operator")]
