"""``make install`` / ``make uninstall`` in a throw-away root (DESTDIR), without the venv step.

Acceptance criteria (issue 10, install):
- the layout: units (ExecStart under PREFIX), udev rules, a sysusers.d entry for the medge user
  in group dialout, configs in /etc/medge (0640, directories 0750) whose state_dir is the unit's
  StateDirectory, the state directory /var/lib/medge (0750);
- a second install changes nothing; a locally edited config is never overwritten (the shipped
  version lands beside it as .dist) while an unedited one follows the new shipped version;
- uninstall removes everything it installed but keeps edited configs and /var/lib/medge;
  PURGE=1 leaves nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted(p.name for p in (REPO / "systemd").glob("*.service"))


def make(target: str, root: Path, **variables: str) -> str:
    env = {**os.environ, "MEDGE_SKIP_VENV": "1"}
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target, f"DESTDIR={root}",
         *(f"{k}={v}" for k, v in variables.items())],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` with its mode and (for files) content."""
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    make("install", root)
    return root


def test_install_lays_out_units_rules_users_configs_and_state(installed: Path) -> None:
    root = installed
    for unit in UNITS:
        path = root / "etc/systemd/system" / unit
        assert mode(path) == 0o644
        assert "ExecStart=/opt/medge/bin/medge run " in path.read_text()
    assert (root / "etc/udev/rules.d/99-medge.rules").read_bytes() == \
        (REPO / "config/udev/99-medge.rules").read_bytes()
    sysusers = (root / "usr/lib/sysusers.d/medge.conf").read_text().splitlines()
    assert "m medge dialout" in sysusers and any(line.startswith("u medge ") for line in sysusers)
    assert mode(root / "etc/medge") == 0o750 and mode(root / "etc/medge/tls") == 0o700
    gateway = root / "etc/medge/gateway-main.toml"
    assert mode(gateway) == 0o640
    assert 'state_dir = "/var/lib/medge/gateway-main"' in gateway.read_text()
    assert "StateDirectory=medge/gateway-%i" in \
        (root / "etc/systemd/system/medge-gateway@.service").read_text()
    pacs = (root / "etc/medge/pacs.toml").read_text()
    assert 'spool_dir = "/var/lib/medge/microscope/pacs-spool"' in pacs  # writable under the unit
    assert mode(root / "etc/medge/ventilators") == 0o750
    assert (root / "etc/medge/ventilators/home-ventilator.toml").exists()
    assert mode(root / "var/lib/medge") == 0o750
    assert (root / "opt/medge/share/medge/mosquitto/mosquitto.conf").exists()


def test_installed_daemon_configs_are_valid(installed: Path) -> None:
    configs = sorted(installed.glob("etc/medge/*.toml"))
    daemons = [p for p in configs if p.name.startswith(("gateway", "microscope", "manipulator"))]
    assert len(daemons) >= 2
    result = subprocess.run(
        [str(REPO / ".venv/bin/medge"), "config", "check", *map(str, daemons)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_prefix_moves_the_venv_and_execstart(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make("install", root, PREFIX="/srv/medge")
    unit = (root / "etc/systemd/system/medge-microscope.service").read_text()
    assert "ExecStart=/srv/medge/bin/medge run microscope" in unit
    assert (root / "srv/medge/share/medge/manifest").exists()
    assert not (root / "opt").exists()


def test_second_install_changes_nothing(installed: Path) -> None:
    before = snapshot(installed)
    make("install", installed)
    assert snapshot(installed) == before


def test_edited_config_is_kept_and_the_new_version_lands_beside_it(installed: Path) -> None:
    edited = installed / "etc/medge/gateway-main.toml"
    edited.write_text(edited.read_text().replace('site = "home-demo"', 'site = "ward-7"'))
    untouched = installed / "etc/medge/ventilators/home-ventilator.toml"
    pristine = installed / "opt/medge/share/medge/config-dist/ventilators/home-ventilator.toml"
    # simulate an older shipped version of the untouched file: install must update it
    untouched.write_text("# old shipped version\n")
    pristine.write_text("# old shipped version\n")
    output = make("install", installed)
    assert 'site = "ward-7"' in edited.read_text()
    assert "kept your /etc/medge/gateway-main.toml" in output
    assert 'site = "home-demo"' in (installed / "etc/medge/gateway-main.toml.dist").read_text()
    assert untouched.read_bytes() == (REPO / "config/ventilators/home-ventilator.toml").read_bytes()
    assert not untouched.with_name(untouched.name + ".dist").exists()


def test_uninstall_keeps_data_and_edited_configs_purge_removes_all(installed: Path) -> None:
    state = installed / "var/lib/medge/gateway-main"
    state.mkdir()
    (state / "outbox.sqlite").write_bytes(b"undelivered")
    edited = installed / "etc/medge/microscope.toml"
    edited.write_text(edited.read_text() + "\n# local note\n")
    make("install", installed)  # writes microscope.toml.dist
    make("uninstall", installed)
    remaining = sorted(str(p.relative_to(installed)) for p in installed.rglob("*") if p.is_file())
    assert remaining == ["etc/medge/microscope.toml", "var/lib/medge/gateway-main/outbox.sqlite"]
    make("uninstall", installed, PURGE="1")  # nothing left to uninstall: a no-op, not an error
    make("install", installed)
    make("uninstall", installed, PURGE="1")
    assert [p for p in installed.rglob("*") if p.is_file()] == []
