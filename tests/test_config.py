"""Configuration: every kind of bad input gives one line naming file, key and reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medge import config
from medge.config import ConfigError, Secret, bounds
from medge.settings import DaemonConfig

GOOD = """
[node]
site = "home-042"
node = "gw-7"
state_dir = "state"

[mqtt]
host = "127.0.0.1"
port = 8883
username = "gw-7"
password_file = "secret.txt"
keepalive = 20

[mqtt.tls]
ca_file = "ca.crt"

[outbox]
max_bytes = 1048576
sync = "normal"
ttl = { state = 30, status = 600 }

[log]
level = "debug"
"""


def write(tmp_path: Path, text: str, secret_mode: int = 0o600) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret\n")
    secret.chmod(secret_mode)
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_good_config_loads_into_typed_objects(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD), DaemonConfig)
    assert cfg.node.site == "home-042"
    assert cfg.node.state_dir == tmp_path / "state"  # relative paths are relative to the file
    assert cfg.mqtt.port == 8883
    assert cfg.mqtt.password_file is not None and cfg.mqtt.password_file.value == "s3cret"
    assert "s3cret" not in repr(cfg), "secrets never appear in reprs or logs"
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == tmp_path / "ca.crt"
    assert cfg.outbox.ttl == {"state": 30.0, "status": 600.0}
    assert cfg.outbox.sync == "normal"


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (("keepalive = 20", "keep_alive = 20"), "mqtt.keep_alive", "unknown key"),
        (("port = 8883", 'port = "8883"'), "mqtt.port", "expected an integer"),
        (("port = 8883", "port = 70000"), "mqtt.port", "at most 65535"),
        (("port = 8883", "port = 0"), "mqtt.port", "at least 1"),
        (('sync = "normal"', 'sync = "sometimes"'), "outbox.sync", "must be one of"),
        (('site = "home-042"', 'site = "home/042"'), "node", "must be 1-64 characters"),
        (('site = "home-042"\n', ""), "node.site", "required key is missing"),
        (("state = 30", "state = -1"), "outbox.ttl.state", "at least 0"),
        (('level = "debug"', "level = true"), "log.level", "must be one of"),
        (("[mqtt.tls]", "[mqtt.tlz]"), "mqtt.tlz", "unknown key"),
        (("keepalive = 20", "keepalive = 20.5"), "mqtt.keepalive", "expected an integer"),
    ],
)
def test_bad_values_name_file_key_and_reason(
    tmp_path: Path, change: tuple[str, str], key: str, reason: str
) -> None:
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as error:
        config.load(path, DaemonConfig)
    message = str(error.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert reason in message
    assert "\n" not in message


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: file not found"):
        config.load(tmp_path / "nope.toml", DaemonConfig)
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nsite = 1")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        config.load(bad, DaemonConfig)


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, secret_mode=0o644)
    with pytest.raises(ConfigError) as error:
        config.load(path, DaemonConfig)
    assert "mqtt.password_file" in str(error.value)
    assert "readable by group/other" in str(error.value)
    assert "chmod 600" in str(error.value)


def test_missing_and_empty_secret(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    (tmp_path / "secret.txt").unlink()
    with pytest.raises(ConfigError, match="mqtt.password_file: secret file .* No such file"):
        config.load(path, DaemonConfig)
    (tmp_path / "secret.txt").write_text("\n")
    (tmp_path / "secret.txt").chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        config.load(path, DaemonConfig)


def test_tls_key_must_be_private_and_paired(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("KEY")
    key.chmod(0o640)
    text = GOOD.replace(
        'ca_file = "ca.crt"', 'ca_file = "ca.crt"\ncert_file = "c.crt"\nkey_file = "client.key"'
    )
    with pytest.raises(ConfigError, match="mqtt.tls: .*readable by group/other"):
        config.load(write(tmp_path, text), DaemonConfig)
    text = GOOD.replace('ca_file = "ca.crt"', 'ca_file = "ca.crt"\ncert_file = "c.crt"')
    with pytest.raises(ConfigError, match="mqtt.tls: cert_file and key_file go together"):
        config.load(write(tmp_path, text), DaemonConfig)


@dataclass(frozen=True)
class Nested:
    ratios: list[float] = field(default_factory=list, metadata=bounds(max=2))
    secret: Secret | None = None
    level: int = field(default=1, metadata=bounds(min=0, max=5, min_exclusive=True))


def test_lists_bounds_and_exclusive_minimum() -> None:
    assert config.from_mapping({"ratios": [1, 2.5]}, Nested).ratios == [1.0, 2.5]
    with pytest.raises(ConfigError, match=r"ratios\[1\]: expected a number"):
        config.from_mapping({"ratios": [1, "x"]}, Nested)
    with pytest.raises(ConfigError, match="number of items must be at most 2"):
        config.from_mapping({"ratios": [1, 2, 3]}, Nested)
    with pytest.raises(ConfigError, match="level: value must be greater than 0"):
        config.from_mapping({"level": 0}, Nested)
    with pytest.raises(ConfigError, match="ratios: expected an array"):
        config.from_mapping({"ratios": 3}, Nested)
    with pytest.raises(ConfigError, match="level: expected an integer"):
        config.from_mapping({"level": True}, Nested)
    with pytest.raises(ConfigError, match="must be a finite number"):
        config.from_mapping({"ratios": [float("nan")]}, Nested)
