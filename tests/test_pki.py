"""``medge pki``: site CAs, CSRs made on the device, signing, revocation and CRLs.

Acceptance criteria (issue 10, device identity):
- private keys are created where they are used, with mode 0600 from the start, and never written
  into the CA directory; an existing key is reused, never overwritten;
- the CA signs only a CSR whose signature verifies and whose CN is the name asked for, with the
  role's extended key usage and lifetime; device and operator certificates come from different
  CAs (a device certificate is not valid as an operator's);
- ``revoke`` puts the serial in a CRL that OpenSSL (what mosquitto uses) honours;
- every bad input (garbage CSR, wrong name, bad lifetime, readable key, missing CA) is a one-line
  error and exit status 1, never a traceback.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medge.cli import main
from medge.exitcodes import EXIT_FAILURE, EXIT_OK


def pki(*argv: str | Path) -> int:
    return main(["pki", *(str(a) for a in argv)])


@pytest.fixture
def site(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    assert pki("init", "--dir", directory, "--site", "ward-7") == EXIT_OK
    return directory


def request(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """What a device does: its own key and a CSR, in the device's own directory."""
    device_dir = tmp_path / name
    device_dir.mkdir(exist_ok=True)
    key, csr = device_dir / f"{name}.key", device_dir / f"{name}.csr"
    assert pki("request", name, "--key", key, "--out", csr) == EXIT_OK
    return key, csr


def issue(site: Path, role: str, name: str, csr: Path, *extra: str) -> x509.Certificate:
    out = csr.with_suffix(".crt")
    assert pki(f"issue-{role}", name, "--dir", site, "--csr", csr, "--out", out, *extra) == EXIT_OK
    return x509.load_pem_x509_certificate(out.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ca_cert(site: Path, ca: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((site / ca / "ca.crt").read_bytes())


def test_init_makes_two_cas_with_private_keys_and_refuses_to_replace_them(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for ca in ("device-ca", "operator-ca"):
        assert mode(site / ca / "ca.key") == 0o600
        assert ca_cert(site, ca).extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert x509.load_pem_x509_crl((site / ca / "crl.pem").read_bytes()).next_update_utc
    before = (site / "device-ca" / "ca.key").read_bytes()
    capsys.readouterr()
    assert pki("init", "--dir", site, "--site", "ward-7") == EXIT_FAILURE
    assert "refusing to replace" in capsys.readouterr().err
    assert (site / "device-ca" / "ca.key").read_bytes() == before


def test_device_key_stays_on_the_device_and_is_reused_for_renewal(
    site: Path, tmp_path: Path
) -> None:
    key, csr = request(tmp_path, "gw-0001")
    assert mode(key) == 0o600
    first = issue(site, "device", "gw-0001", csr)
    key_bytes = key.read_bytes()
    _, csr = request(tmp_path, "gw-0001")  # renewal: same key, new CSR
    assert key.read_bytes() == key_bytes
    second = issue(site, "device", "gw-0001", csr)
    assert first.public_key() == second.public_key()
    assert first.serial_number != second.serial_number
    assert not any(p.read_bytes() == key_bytes for p in site.rglob("*") if p.is_file())


def test_device_and_operator_certificates_have_their_role_ca_usage_and_lifetime(
    site: Path, tmp_path: Path
) -> None:
    _, device_csr = request(tmp_path, "gw-0001")
    device = issue(site, "device", "gw-0001", device_csr)
    _, operator_csr = request(tmp_path, "dr-alice")
    operator = issue(site, "operator", "dr-alice", operator_csr)
    device.verify_directly_issued_by(ca_cert(site, "device-ca"))
    operator.verify_directly_issued_by(ca_cert(site, "operator-ca"))
    with pytest.raises(ValueError):
        device.verify_directly_issued_by(ca_cert(site, "operator-ca"))
    assert device.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-0001"
    for certificate, days in ((device, 365), (operator, 90)):
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        lifetime = certificate.not_valid_after_utc - datetime.now(UTC)
        assert timedelta(days=days - 1) < lifetime <= timedelta(days=days)


def test_server_certificate_carries_its_subject_alternative_names(
    site: Path, tmp_path: Path
) -> None:
    key, csr = tmp_path / "broker.key", tmp_path / "broker.csr"
    assert pki("request", "localhost", "--key", key, "--out", csr,
               "--san", "localhost", "--san", "127.0.0.1") == EXIT_OK
    server = issue(site, "server", "localhost", csr)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def openssl_verify(site: Path, certificate: Path) -> subprocess.CompletedProcess[str]:
    ca = site / "device-ca"
    return subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", str(ca / "ca.crt"),
                           "-CRLfile", str(ca / "crl.pem"), str(certificate)],
                          capture_output=True, text=True, check=False)


def test_revoked_certificate_fails_openssl_crl_check(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, csr = request(tmp_path, "gw-0001")
    revoked = issue(site, "device", "gw-0001", csr)
    _, other_csr = request(tmp_path, "gw-0002")
    issue(site, "device", "gw-0002", other_csr)
    assert openssl_verify(site, csr.with_suffix(".crt")).returncode == 0
    capsys.readouterr()
    assert pki("revoke", "gw-0001", "--dir", site, "--json") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["revoked"] == [revoked.serial_number]
    result = openssl_verify(site, csr.with_suffix(".crt"))
    assert result.returncode != 0 and "revoked" in result.stdout + result.stderr
    assert openssl_verify(site, other_csr.with_suffix(".crt")).returncode == 0
    crl = x509.load_pem_x509_crl((site / "device-ca" / "crl.pem").read_bytes())
    assert [r.serial_number for r in crl] == [revoked.serial_number]
    assert pki("crl", "--dir", site) == EXIT_OK  # re-signing keeps the revocation
    crl = x509.load_pem_x509_crl((site / "device-ca" / "crl.pem").read_bytes())
    assert [r.serial_number for r in crl] == [revoked.serial_number]


def tampered(csr: Path) -> bytes:
    """Same CSR with one byte of the signed body flipped: its signature no longer verifies."""
    loaded = x509.load_pem_x509_csr(csr.read_bytes())
    der = bytearray(loaded.public_bytes(Encoding.DER))
    position = der.index(b"gw-0001")
    der[position] = ord("G")
    body = base64.encodebytes(bytes(der)).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines)
            + "\n-----END CERTIFICATE REQUEST-----\n").encode()


@pytest.mark.parametrize("case, expected", [
    ("garbage-csr", "not a PEM certificate signing request"),
    ("wrong-name", "not 'gw-0002'"),
    ("tampered", "signature does not verify"),
    ("too-long", "days must be"),
    ("bad-name", "must be 1-64 characters"),
    ("no-ca", "no CA here"),
    ("revoke-unknown", "no unrevoked certificate"),
])
def test_bad_input_is_one_clear_error(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str
) -> None:
    _, csr = request(tmp_path, "gw-0001")
    out = tmp_path / "out.crt"
    argv: list[str | Path] = ["issue-device", "gw-0001", "--dir", site, "--csr", csr,
                              "--out", out]
    if case == "garbage-csr":
        csr.write_text("hello\n")
    elif case == "wrong-name":
        argv[1] = "gw-0002"
    elif case == "tampered":
        csr.write_bytes(tampered(csr))
    elif case == "too-long":
        argv += ["--days", "100000"]
    elif case == "bad-name":
        argv[1] = "gw/0001"
    elif case == "no-ca":
        argv[3] = tmp_path / "nowhere"
    elif case == "revoke-unknown":
        argv = ["revoke", "gw-0009", "--dir", site]
    capsys.readouterr()
    assert pki(*argv) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_key_readable_by_others_is_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    key, csr = request(tmp_path, "gw-0001")
    key.chmod(0o644)
    assert pki("request", "gw-0001", "--key", key, "--out", csr) == EXIT_FAILURE
    assert "readable by group/other" in capsys.readouterr().err
