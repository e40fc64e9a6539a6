"""The report of a finished scan: what was planned, captured and flagged, how well focus and
stitching fit, what the validators said, where the images went, and how long each phase took.

It is a JSON document in the job directory (``report.json``) and in the job state, so
``medge scan report JOB`` works from any workstation; :func:`render` makes the text version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemons.microscope.jobs import PHASES, JobState


def validation_summary(dicom_dir: Path, openslide: bool = True) -> dict[str, Any]:
    """Run dciodvfy/dcentvfy/OpenSlide/frame checks; a missing validator is reported, not
    fatal (the series is still delivered)."""
    from daemons.microscope.wsi.dicom_validate import ValidatorMissing, validate_series

    try:
        result = validate_series(dicom_dir, openslide=openslide)
    except ValidatorMissing as exc:
        return {"ok": None, "error": str(exc), "findings": []}
    return {
        "ok": result.ok,
        "instances": len(result.files),
        "errors": len(result.errors),
        "findings": [{"file": str(f.file), "check": f.check, "message": f.message,
                      "fatal": f.fatal} for f in result.findings][:50],
    }


def build(state: JobState, validation: dict[str, Any], stitching: dict[str, Any]) -> dict[str, Any]:
    residuals = state.focus.get("residuals_um", [])
    flagged = sorted(int(i) for i in state.plan_info.get("flagged", []))
    return {
        "job": state.id,
        "barcode": state.spec.barcode,
        "accession": state.spec.accession,
        "objective": state.spec.objective,
        "status": state.status,
        "tiles": {"planned": len(state.plan), "captured": len(state.tiles),
                  "flagged": flagged},
        "focus": {"points": len(residuals),
                  "max_abs_residual_um": max((abs(r) for r in residuals), default=0.0),
                  "residuals_um": residuals,
                  "rms_residual_um": state.focus.get("rms_residual_um", 0.0),
                  "outliers": state.focus.get("outliers", []),
                  "surface_degree": state.focus.get("degree"),
                  "failed_points": state.focus.get("failed", [])},
        "stitching": stitching,
        "validation": validation,
        "delivery": state.delivery or "none",
        "resumes": state.resumes,
        "timings_s": {phase: round(state.timings[phase], 3) for phase in PHASES
                      if phase in state.timings},
    }


def render(report: dict[str, Any]) -> str:
    """The technician's view: one fact per line."""
    tiles = report["tiles"]
    focus = report["focus"]
    validation = report["validation"]
    verdict = {True: "passed", False: f"FAILED ({validation.get('errors', '?')} error(s))",
               None: f"not run ({validation.get('error', '')})"}[validation.get("ok")]
    stitching = report["stitching"]
    lines = [
        f"job {report['job']}  slide {report['barcode']}  accession {report['accession']}"
        f"  objective {report['objective']}  status {report['status']}",
        f"tiles: {tiles['planned']} planned, {tiles['captured']} captured,"
        f" {len(tiles['flagged'])} flagged",
        f"focus: {focus['points']} points, max residual {focus['max_abs_residual_um']:.2f} µm,"
        f" RMS {focus['rms_residual_um']:.2f} µm, {len(focus['outliers'])} outlier(s)",
        f"stitching: {stitching.get('placement', '-')}, residual"
        f" {stitching.get('residual_px', 0.0):.2f} px, rejected pairs"
        f" {stitching.get('rejected_pairs', 0)}",
        f"validation: {verdict}",
        f"delivery: {report['delivery']}",
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items()),
    ]
    for finding in validation.get("findings", [])[:10]:
        lines.append(f"  [{finding['check']}] {finding['message']}")
    return "\n".join(lines)
