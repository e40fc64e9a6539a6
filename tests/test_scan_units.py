"""Scan building blocks without processes: job validation, durable state, tissue detection,
tile planning, focus fitting, tile checksums and mosaic placement."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemons.microscope import scan
from daemons.microscope.jobs import (
    JobError,
    JobSpec,
    JobState,
    JobStore,
    StateCorrupt,
    TileRecord,
    load_for_start,
    new_job_id,
    parse_spec,
    remove_delivered_files,
    write_atomically,
)
from daemons.microscope.rig import load_objectives, small_slide
from medge.config import ConfigError

OBJECTIVES = {"10x", "20x"}
VALID: dict[str, Any] = {"barcode": "S-001", "accession": "ACC.42", "patient": "P_9",
                         "objective": "20x"}


def test_a_valid_job_keeps_every_field() -> None:
    spec = parse_spec({**VALID, "stain": "H", "area_mm": [1, 2, 3, 4.5], "pacs": "lab",
                       "folder": "/srv/wsi", "jpeg_quality": 80}, OBJECTIVES, {"lab"})
    assert spec == JobSpec("S-001", "ACC.42", "P_9", "20x", "H", (1.0, 2.0, 3.0, 4.5), "lab",
                           "/srv/wsi", 80)


@pytest.mark.parametrize(("change", "field"), [
    ({"barcode": ""}, "barcode"),
    ({"barcode": "../etc"}, "barcode"),
    ({"accession": 12}, "accession"),
    ({"patient": None}, "patient"),
    ({"objective": "63x"}, "objective"),
    ({"stain": "PAS"}, "stain"),
    ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"jpeg_quality": True}, "jpeg_quality"),
    ({"area_mm": [1, 2, 3]}, "area_mm"),
    ({"area_mm": [3, 2, 1, 4]}, "area_mm"),
    ({"area_mm": [1, 2, float("nan"), 4]}, "area_mm"),
    ({"area_mm": "1,2,3,4"}, "area_mm"),
    ({"pacs": "nowhere"}, "pacs"),
    ({"folder": "relative/dir"}, "folder"),
    ({"colour": "blue"}, "colour"),
])
def test_an_invalid_job_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(JobError) as caught:
        parse_spec({**VALID, **change}, OBJECTIVES, {"lab"})
    assert caught.value.field == field


def test_a_job_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(JobError, match="JSON object"):
        parse_spec(["S-001"], OBJECTIVES, set())


def test_job_state_survives_a_round_trip_through_the_store(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    state = JobState(new_job_id(), parse_spec({**VALID, "area_mm": [0, 0, 1, 1]}, OBJECTIVES,
                                              set()))
    state.plan = [(0.0, 0.0), (144.0, 0.0)]
    state.tiles[1] = TileRecord(1, 144.0, 0.0, -5000.0, "ab" * 32)
    state.focus = {"degree": 0, "points": [[0.0, 0.0, -5000.0]], "residuals_um": [0.0]}
    store.save(state)
    loaded = store.load(state.id)
    assert loaded == state
    assert loaded.first_missing_tile() == 0
    assert not list(tmp_path.glob("*/.state.json.*.tmp"))


def test_a_corrupt_state_file_is_reported_not_dropped(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    good = JobState(new_job_id(), parse_spec(VALID, OBJECTIVES, set()))
    store.save(good)
    broken = tmp_path / "20260101-000000-abcdef"
    broken.mkdir()
    (broken / "state.json").write_text("{not json")
    assert store.ids() == ["20260101-000000-abcdef", good.id]
    assert store.load(good.id) == good
    with pytest.raises(StateCorrupt, match="20260101-000000-abcdef"):
        store.load("20260101-000000-abcdef")
    with pytest.raises(JobError, match="not a job id"):
        store.load("../../etc")


def test_only_delivered_scans_past_their_keep_time_lose_their_tiles_and_dicom(
        tmp_path: Path) -> None:
    """Without retention the disk filled and scanning stopped; a job that may still need its
    files (failed, cancelled, spooled, busy, unreadable) keeps them."""
    store = JobStore(tmp_path)
    jobs = {}
    for name, status, delivery, finished_at in [
            ("old", "done", "delivered", 1000.0), ("recent", "done", "delivered", 3000.0),
            ("spooled", "done", "spooled", 1000.0), ("failed", "failed", "", 1000.0),
            ("cancelled", "cancelled", "", 1000.0), ("busy", "done", "delivered", 1000.0)]:
        job = JobState(new_job_id(), parse_spec(VALID, OBJECTIVES, set()), status=status,
                       delivery=delivery, finished_at=finished_at)
        store.save(job)
        for directory in ("tiles", "dicom"):
            (tmp_path / job.id / directory).mkdir()
            (tmp_path / job.id / directory / "0.bin").write_bytes(b"x")
        (tmp_path / job.id / "overview.png").write_bytes(b"png")
        jobs[name] = job.id
    corrupt = tmp_path / "20260101-000000-abcdef"
    (corrupt / "tiles").mkdir(parents=True)
    (corrupt / "state.json").write_text("{not json")

    removed = remove_delivered_files(store, finished_before=2000.0, busy={jobs["busy"]})

    assert [job.id for job in removed] == [jobs["old"]]
    old = store.load(jobs["old"])
    assert old.files_removed_at > 0 and "removed" in old.message
    assert sorted(p.name for p in (tmp_path / jobs["old"]).iterdir()) == [
        "overview.png", "settled.json", "state.json"]
    for name in ("recent", "spooled", "failed", "cancelled", "busy"):
        assert (tmp_path / jobs[name] / "tiles" / "0.bin").exists(), name
        assert store.load(jobs[name]).files_removed_at == 0, name
    assert (corrupt / "tiles").exists()
    assert remove_delivered_files(store, finished_before=2000.0, busy=set()) == [
        store.load(jobs["busy"])]


def test_on_a_full_disk_the_files_go_first_and_the_removal_is_recorded_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path)
    job = JobState(new_job_id(), parse_spec(VALID, OBJECTIVES, set()), status="done",
                   delivery="delivered", finished_at=1.0)
    store.save(job)
    (tmp_path / job.id / "tiles").mkdir()
    write = store.write
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def full_once(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        write(*args, **kwargs)

    monkeypatch.setattr(store, "write", full_once)
    assert [j.id for j in remove_delivered_files(store, 2.0, set())] == [job.id]
    assert not (tmp_path / job.id / "tiles").exists()
    assert store.load(job.id).files_removed_at > 0


def test_a_start_reads_live_jobs_whole_and_only_the_last_finished_summaries(
        tmp_path: Path) -> None:
    """A start loaded every job's whole state (~290 KB and ~10 ms for 1,500 tiles): a busy
    lab's first year of slides took minutes, past systemd's start timeout."""
    store = JobStore(tmp_path)
    ids = [f"20260101-00000{n}-aaaaaa" for n in range(1, 8)]
    for job_id, status, delivery, finished_at in zip(ids, [
            "queued", "done", "done", "done", "done", "failed", "done"], [
            "", "delivered", "spooled", "delivered", "none", "", "none"], [
            0.0, 9.0, 3.0, 4.0, 5.0, 2.0, 7.0], strict=True):  # the 2nd: resumed, done last
        store.save(JobState(job_id, parse_spec(VALID, OBJECTIVES, set()), status=status,
                            delivery=delivery, finished_at=finished_at))
    (tmp_path / ids[5] / "state.json").write_text("{finished first: never read")
    (tmp_path / ids[3] / "settled.json").unlink()  # stored before settled files existed
    (tmp_path / ids[6] / "settled.json").unlink()
    (tmp_path / ids[6] / "state.json").write_text("{not json")

    found = load_for_start(store, recent_jobs=3)

    assert [job.id for job in found.live] == [ids[0], ids[2]]  # queued; spooled for the PACS
    assert list(found.recent) == [ids[1], ids[4], ids[3]]  # finished at 9, 5, 4
    assert found.recent[ids[3]] == (4.0, store.load(ids[3]).summary())
    assert len(found.unreadable) == 1 and ids[6] in found.unreadable[0]
    assert store.settled_at(ids[3]) == 4.0  # written back: a stat at the next start


def test_a_settled_job_changed_again_loses_its_settled_file(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job = JobState(new_job_id(), parse_spec(VALID, OBJECTIVES, set()), status="failed",
                   finished_at=5.0)
    store.save(job)
    assert store.settled(job.id) == (5.0, job.summary())
    job.status = "queued"  # resumed by the technician
    store.save(job)
    assert store.settled_at(job.id) is None and store.settled(job.id) is None
    job.status, job.delivery = "done", "spooled"
    store.save(job)
    assert store.settled_at(job.id) is None


def test_a_failed_atomic_write_keeps_the_old_content_and_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every failed save on a full disk left a partial temporary file (the chaos disk-full
    fault fails each write at 4 KiB; a job's state is saved after every tile)."""
    path = tmp_path / "state.json"
    write_atomically(path, b"old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, b"new" * 10_000)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_tissue_is_found_where_the_slide_is_stained() -> None:
    slide = small_slide(seed=3)
    overview = slide.render(0, 0, 160, 120, 20.0)
    mask = scan.detect_tissue(overview)
    # The test slide's patch is centred at 55 % / 50 % of the slide; its corners are glass.
    assert mask[60, 88]
    assert not mask[:5, :5].any() and not mask[-5:, -5:].any()
    assert 0.1 < mask.mean() < 0.6
    assert not scan.detect_tissue(overview, label_width_px=160).any()


def test_the_plan_is_serpentine_and_skips_tiles_without_tissue() -> None:
    tissue = np.zeros((100, 100), bool)
    tissue[10:30, 10:30] = True  # 200 x 200 µm at 10 µm/px, from (100, 100) µm
    tissue[70:75, 70:75] = True  # a small island far away
    geometry = scan.Geometry(um_per_px=1.0, width_px=100, height_px=100, overlap=0.0)
    plan = scan.plan_tiles(tissue, 10.0, geometry, margin_um=0.0)
    assert len(plan) == len(set(plan))
    first_row = min(y for _, y in plan)
    for row in sorted({y for _, y in plan}):  # serpentine: even grid rows left to right
        xs = [x for x, y in plan if y == row]
        assert xs == sorted(xs, reverse=round((row - first_row) / 100) % 2 == 1)
    assert [y for _, y in plan] == sorted(y for _, y in plan)  # row by row
    mask_area = np.kron(tissue, np.ones((10, 10), bool))
    for x, y in plan:
        assert mask_area[int(y):int(y) + 100, int(x):int(x) + 100].any(), (x, y)
    # Every tissue pixel is covered by some tile.
    covered = np.zeros_like(mask_area)
    for x, y in plan:
        covered[int(y):int(y) + 100, int(x):int(x) + 100] = True
    assert covered[mask_area].all()
    full_grid = 9 * 9
    assert len(plan) < full_grid


def test_the_plan_respects_a_given_area_and_the_margin() -> None:
    tissue = np.zeros((100, 100), bool)
    tissue[50, 50] = True
    geometry = scan.Geometry(um_per_px=1.0, width_px=100, height_px=100, overlap=0.1)
    assert scan.plan_tiles(tissue, 10.0, geometry, 0.0, area_um=(0, 0, 300, 300)) == []
    with_margin = scan.plan_tiles(tissue, 10.0, geometry, 200.0, area_um=(0, 0, 300, 300))
    assert with_margin and all(x + 100 <= 300 + 90 and y + 100 <= 300 + 90
                               for x, y in with_margin)


def test_focus_points_are_spread_and_unique() -> None:
    plan = [(x * 100.0, y * 100.0) for y in range(4) for x in range(5)]
    chosen = scan.focus_points(plan, 5)
    assert len(chosen) == len(set(chosen)) == 5
    assert {plan[i] for i in chosen} >= {(0.0, 0.0), (400.0, 300.0), (400.0, 0.0), (0.0, 300.0)}
    assert scan.focus_points(plan[:1], 5) == [0]


def test_a_damaged_tile_is_dropped_for_recapture(tmp_path: Path) -> None:
    state = JobState(new_job_id(), parse_spec(VALID, OBJECTIVES, set()))
    state.plan = [(0.0, 0.0), (10.0, 0.0)]
    frame = np.full((8, 8, 3), 100, np.uint8)
    for index in (0, 1):
        digest = scan.save_tile(scan.tile_path(tmp_path, index), frame)
        state.tiles[index] = TileRecord(index, 0.0, 0.0, 0.0, digest)
    scan.tile_path(tmp_path, 1).write_bytes(b"truncated")
    assert scan.verify_tiles(state, tmp_path) == [1]
    assert list(state.tiles) == [0]
    assert state.first_missing_tile() == 1


def test_the_tiles_folder_stitches_back_into_the_slide(tmp_path: Path) -> None:
    from daemons.microscope.wsi.pipeline import build_pyramid

    slide = small_slide(seed=1)
    geometry = scan.Geometry(um_per_px=1.0, width_px=160, height_px=120, overlap=0.25)
    step_x, step_y = geometry.step_um
    plan = [(1000 + c * step_x, 900 + r * step_y) for r in range(3) for c in range(4)]
    records = []
    for index, (x, y) in enumerate(plan):
        digest = scan.save_tile(scan.tile_path(tmp_path, index),
                                slide.render(x, y, 160, 120, 1.0))
        records.append(TileRecord(index, x, y, 0.0, digest))
    scan.write_tiles_folder(tmp_path, plan, records, geometry)
    result = build_pyramid(tmp_path, tmp_path / "work", tile_size=64)
    base = result.levels[0]
    width, height = base.width, base.height
    assert (width, height) == (160 + 3 * 120, 120 + 2 * 90)
    mosaic = np.zeros((-(-height // 64) * 64, -(-width // 64) * 64, 3), np.uint8)
    columns = mosaic.shape[1] // 64
    for number, tile in enumerate(base.tiles()):
        row, column = divmod(number, columns)
        mosaic[row * 64:(row + 1) * 64, column * 64:(column + 1) * 64] = tile
    expected = slide.render(1000, 900, width, height, 1.0)
    difference = np.abs(mosaic[:height, :width].astype(int) - expected.astype(int))
    assert difference.mean() < 1.0
    assert result.report.accepted > 0


def test_the_objectives_file_names_a_bad_entry(tmp_path: Path) -> None:
    good = load_objectives(Path(__file__).parents[1] / "config" / "objectives.toml")
    assert good["20x"].um_per_px == 0.5
    bad = tmp_path / "objectives.toml"
    bad.write_text("[objectives.20x]\nmagnification = 20\nnumerical_aperture = 1.2\n"
                   "um_per_px = 0.5\n")
    with pytest.raises(ConfigError, match="objectives.20x"):
        load_objectives(bad)
    bad.write_text("[objectives.20x]\nmagnification = 20\nnumerical_aperture = 0.4\n")
    with pytest.raises(ConfigError, match="um_per_px"):
        load_objectives(bad)


def test_report_is_json_serialisable_and_renders() -> None:
    from daemons.microscope import report

    state = JobState(new_job_id(), parse_spec(VALID, OBJECTIVES, set()), status="done")
    state.plan = [(0.0, 0.0)]
    state.tiles[0] = TileRecord(0, 0.0, 0.0, 0.0, "00")
    state.focus = {"residuals_um": [0.2, -0.4], "rms_residual_um": 0.32, "degree": 1}
    state.timings = {"acquire": 1.25, "focus": 2.0}
    built = report.build(state, {"ok": False, "errors": 1, "findings": [
        {"file": "x", "check": "dciodvfy", "message": "bad", "fatal": True}]},
        {"placement": "stage positions", "residual_px": 0.3, "rejected_pairs": 2})
    json.dumps(built)
    text = report.render(built)
    assert "1 planned, 1 captured" in text and "max residual 0.40 µm" in text
    assert "RMS 0.32 µm, 0 outlier(s)" in text
    assert "FAILED (1 error(s))" in text and "rejected pairs 2" in text
    assert list(built["timings_s"]) == ["focus", "acquire"]


def test_concurrent_saves_of_one_job_never_collide(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = JobStore(tmp_path)
    state = JobState(new_job_id(), parse_spec(VALID, OBJECTIVES, set()))
    state.plan = [(float(i), 0.0) for i in range(200)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: store.save(state), range(40)))
    assert store.load(state.id) == state
    assert [p.name for p in (tmp_path / state.id).iterdir()] == ["state.json"]
