"""``medge wsi build|validate|send`` end to end (send against the real Orthanc fixture)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from pydicom import dcmread

from daemons.microscope.wsi.model import PyramidLevel
from daemons.microscope.wsi.synthetic import ScanSpec, write_scan
from medge.cli import main
from medge.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from tests.fixtures.broker import free_port
from tests.fixtures.orthanc import Orthanc
from tests.fixtures.wsi_pyramid import pyramid, synthetic_slide
from tests.test_pacs import new_series


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path]]:
    """Stands in for the stitching pipeline: records its arguments, returns a known pyramid."""
    calls: list[tuple[Path, Path]] = []

    def build_pyramid(tiles_dir: Path, work_dir: Path) -> types.SimpleNamespace:
        calls.append((tiles_dir, work_dir))
        work_dir.mkdir(parents=True)
        levels: list[PyramidLevel] = list(pyramid(synthetic_slide(700, 500), tile_size=256))
        return types.SimpleNamespace(levels=levels)

    module = types.ModuleType("daemons.microscope.wsi.pipeline")
    module.build_pyramid = build_pyramid  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "daemons.microscope.wsi.pipeline", module)
    return calls


def test_build_then_validate(fake_pipeline: list[tuple[Path, Path]], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    tiles = tmp_path / "SLIDE-77"
    tiles.mkdir()
    out = tmp_path / "dicom"
    status = main(["wsi", "build", str(tiles), "--out", str(out), "--patient-id", "PSEUDO-1",
                   "--accession", "ACC-1", "--label-text", "block B2", "--quality", "80"])
    assert status == EXIT_OK, capsys.readouterr().err
    assert fake_pipeline == [(tiles, out / ".work")]
    assert not (out / ".work").exists()
    label = dcmread(out / "label.dcm", stop_before_pixels=True)
    assert (label.BarcodeValue, label.LabelText, label.PatientID) == ("SLIDE-77", "block B2",
                                                                      "PSEUDO-1")
    assert sorted(p.name for p in out.glob("*.dcm")) == [
        "label.dcm", "level-0.dcm", "level-1.dcm", "level-2.dcm", "overview.dcm"]
    capsys.readouterr()
    assert main(["wsi", "validate", str(out)]) == EXIT_OK
    assert "5 instance(s) checked: ok" in capsys.readouterr().out


def test_build_from_a_real_tiles_folder_stitches_writes_and_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No stand-in: the stitching pipeline on a synthetic scan, then the writer and validators."""
    write_scan(tmp_path / "SLIDE-9", ScanSpec(rows=3, cols=3, tile_width=320, tile_height=240))
    out = tmp_path / "dicom"
    status = main(["wsi", "build", str(tmp_path / "SLIDE-9"), "--out", str(out),
                   "--patient-id", "PSEUDO-9", "--accession", "ACC-9"])
    assert status == EXIT_OK, capsys.readouterr().err
    base = dcmread(out / "level-0.dcm", stop_before_pixels=True)
    assert base.TotalPixelMatrixColumns > 2 * 320 and base.TotalPixelMatrixRows > 2 * 240
    capsys.readouterr()
    assert main(["wsi", "validate", str(out)]) == EXIT_OK, capsys.readouterr().err


def test_build_refuses_a_folder_without_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tiles").mkdir()
    status = main(["wsi", "build", str(tmp_path / "tiles"), "--out", str(tmp_path / "o")])
    assert status == EXIT_USAGE
    assert "scan.json: cannot read" in capsys.readouterr().err


def test_build_lossless(fake_pipeline: list[tuple[Path, Path]], tmp_path: Path) -> None:
    (tmp_path / "tiles").mkdir()
    assert main(["wsi", "build", str(tmp_path / "tiles"), "--out", str(tmp_path / "o"),
                 "--lossless"]) == EXIT_OK
    header = dcmread(tmp_path / "o" / "level-0.dcm", stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_build_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wsi", "build", str(tmp_path / "absent"), "--out", str(tmp_path)]) == EXIT_USAGE
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["wsi", "build", str(tmp_path), "--out", str(tmp_path), "--quality", "0"])


def test_validate_reports_errors_and_usage(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    written = new_series(tmp_path / "s")
    ds = dcmread(written.paths[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "WHATEVER", "NONE"]
    ds.save_as(written.paths[0])
    assert main(["wsi", "validate", str(tmp_path / "s"), "--no-openslide"]) == EXIT_FAILURE
    out = capsys.readouterr().out
    assert "[image-type]" in out and "FAILED" in out
    assert main(["wsi", "validate", str(tmp_path / "nothing")]) == EXIT_USAGE


def write_config(tmp_path: Path, orthanc: Orthanc, called_ae: str) -> Path:
    password = tmp_path / "pw"
    password.write_text(orthanc.password)
    password.chmod(0o600)
    config = tmp_path / "pacs.toml"
    config.write_text(
        f'spool_dir = "spool"\n[retry]\ninitial_s = 0.05\nmax_s = 0.2\n'
        f'[destinations.lab]\nprotocol = "dimse"\nhost = "127.0.0.1"\n'
        f'port = {orthanc.dicom_port}\ncalled_ae = "{called_ae}"\ntimeout_s = 10\n'
        f'[destinations.web]\nprotocol = "stow"\nurl = "{orthanc.dicomweb_url}"\n'
        f'username = "{orthanc.username}"\npassword_file = "pw"\n'
    )
    return config


@pytest.mark.parametrize("destination", ["lab", "web"])
def test_send_delivers_with_progress(orthanc: Orthanc, tmp_path: Path, destination: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    written = new_series(tmp_path / "s", seed=21)
    config = write_config(tmp_path, orthanc, orthanc.aet)
    status = main(["wsi", "send", str(tmp_path / "s"), "--to", destination,
                   "--config", str(config)])
    out = capsys.readouterr().out
    assert status == EXIT_OK, out
    assert "5/5 instances confirmed" in out and f"delivered 5 instance(s) to {destination}" in out
    assert orthanc.instance_uids(written.series_instance_uid) == {
        i.sop_instance_uid for i in written.instances}
    assert list((tmp_path / "spool").iterdir()) == []


def test_send_wrong_ae_title_fails_and_keeps_the_series(
    orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new_series(tmp_path / "s", seed=22)
    config = write_config(tmp_path, orthanc, "WRONG-AET")
    status = main(["wsi", "send", str(tmp_path / "s"), "--to", "lab", "--config", str(config)])
    err = capsys.readouterr().err
    assert status == EXIT_FAILURE
    assert "called AE title not recognised" in err and "kept in" in err
    [job_dir] = (tmp_path / "spool").iterdir()
    assert len(list(job_dir.glob("*.dcm"))) == 5


def test_send_usage_errors(orthanc: Orthanc, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    new_series(tmp_path / "s")
    config = write_config(tmp_path, orthanc, orthanc.aet)
    assert main(["wsi", "send", str(tmp_path / "s"), "--to", "nope",
                 "--config", str(config)]) == EXIT_USAGE
    assert "unknown PACS destination 'nope'" in capsys.readouterr().err
    assert main(["wsi", "send", str(tmp_path / "s"), "--to", "lab",
                 "--config", str(tmp_path / "missing.toml")]) == EXIT_USAGE
    assert "file not found" in capsys.readouterr().err
    assert main(["wsi", "send", str(tmp_path / "empty"), "--to", "lab",
                 "--config", str(config)]) == EXIT_USAGE
    assert "no *.dcm files" in capsys.readouterr().err


def test_send_gives_up_after_timeout_and_keeps_the_series_queued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new_series(tmp_path / "s")
    config = tmp_path / "pacs.toml"
    config.write_text(
        f'spool_dir = "spool"\n[retry]\ninitial_s = 0.05\nmax_s = 0.2\n'
        f'[destinations.down]\nprotocol = "dimse"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'called_ae = "PACS"\ntimeout_s = 2\n'
    )
    status = main(["wsi", "send", str(tmp_path / "s"), "--to", "down", "--config", str(config),
                   "--timeout", "1"])
    captured = capsys.readouterr()
    assert status == EXIT_TIMEOUT
    assert "cannot associate" in captured.out and "stays queued" in captured.err
    [job_dir] = (tmp_path / "spool").iterdir()
    assert len(list(job_dir.glob("*.dcm"))) == 5
