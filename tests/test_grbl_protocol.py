"""Host-side GRBL parsing against the published wire examples, and the pure motion helpers.

Golden lines are copied from ../shared/reference/protocols.md §1 (GRBL 1.1h: interface.md,
report.c) so this test stands on its own in a fresh clone.
"""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.grbl import rapid_move_s
from drivers.grbl_protocol import (
    ALARM_MEANINGS,
    GrblAlarm,
    GrblError,
    Kind,
    NotGrblError,
    ProtocolError,
    classify,
    parse_banner,
    parse_build_info,
    parse_setting,
    parse_status,
    significant_length,
)
from drivers.stage import XYZ, AxisBacklash, Backlash, plan_approach
from firmware_sim.grbl_motion import move_time

# protocols.md §1.1-1.9, verbatim
GOLDEN_BANNER = "Grbl 1.1h ['$' for help]"
GOLDEN_VER = "[VER:1.1h.20190830:]"
GOLDEN_OPT = "[OPT:V,15,128]"
GOLDEN_GC = "[GC:G0 G54 G17 G21 G90 G94 M0 M5 M9 T0 F0. S0.]"
GOLDEN_HLP = "[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]"
GOLDEN_STARTUP = ">G54G20:ok"
GOLDEN_IDLE = "<Idle|MPos:0.000,0.000,0.000|FS:0,0|WCO:0.000,0.000,0.000>"
GOLDEN_MESSAGES = [
    "Reset to continue", "'$H'|'$X' to unlock", "Caution: Unlocked", "Enabled", "Disabled",
    "Check Door", "Check Limits", "Pgm End", "Restoring defaults", "Restoring spindle",
    "Sleeping",
]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("ok", Kind.OK),
        ("error:15", Kind.ERROR),
        ("ALARM:3", Kind.ALARM),
        (GOLDEN_IDLE, Kind.STATUS),
        (GOLDEN_VER, Kind.REPORT),
        (GOLDEN_OPT, Kind.REPORT),
        (GOLDEN_GC, Kind.REPORT),
        (GOLDEN_HLP, Kind.REPORT),
        ("[G54:0.000,0.000,0.000]", Kind.REPORT),
        ("[PRB:0.000,0.000,0.000:0]", Kind.REPORT),
        ("$110=500.000", Kind.SETTING),
        ("$0=10", Kind.SETTING),
        (GOLDEN_BANNER, Kind.BANNER),
        (GOLDEN_STARTUP, Kind.STARTUP),
        ("oj", Kind.OTHER),
        ("Grbl 1.1h", Kind.OTHER),
    ],
)
def test_classify_golden_lines(line: str, kind: Kind) -> None:
    assert classify(line) is kind


@pytest.mark.parametrize("message", GOLDEN_MESSAGES)
def test_feedback_messages_are_messages(message: str) -> None:
    assert classify(f"[MSG:{message}]") is Kind.MESSAGE


def test_golden_idle_report() -> None:
    status = parse_status(GOLDEN_IDLE)
    assert (status.state, status.substate) == ("Idle", None)
    assert status.mpos == status.wpos == status.wco == (0.0, 0.0, 0.0)
    assert (status.feed, status.spindle) == (0.0, 0.0)
    assert status.overrides is None and status.planner_free is None


def test_every_field_of_the_report_form() -> None:
    # the exact form of protocols.md §1.9 with values filled in
    line = ("<Hold:1|WPos:1.000,-2.500,3.125|Bf:12,96|Ln:99|FS:500,8000|Pn:XYZPDHRS|"
            "WCO:0.500,0.500,-0.125|Ov:110,50,100|A:SFM>")
    status = parse_status(line)
    assert (status.state, status.substate) == ("Hold", 1)
    assert status.wpos == (1.0, -2.5, 3.125)
    assert status.mpos == (1.5, -2.0, 3.0)
    assert (status.planner_free, status.rx_free) == (12, 96)
    assert status.line_number == 99
    assert (status.feed, status.spindle) == (500.0, 8000.0)
    assert status.pins == "XYZPDHRS"
    assert status.overrides == (110, 50, 100)
    assert status.accessories == "SFM"


def test_wpos_uses_last_known_wco_and_f_without_spindle() -> None:
    status = parse_status("<Door:2|WPos:1.000,1.000,1.000|F:300>", wco=(1.0, 2.0, 3.0))
    assert (status.state, status.substate) == ("Door", 2)
    assert status.mpos == (2.0, 3.0, 4.0)
    assert status.feed == 300.0 and status.spindle is None


@pytest.mark.parametrize(
    "line",
    [
        "<Idle|MPos:0.000,0.000>",
        "<Idle|FS:0,0>",
        "<Running|MPos:0,0,0>",
        "<Hold:x|MPos:0,0,0>",
        "<Hold:²|MPos:0,0,0>",
        "<Idle|MPos:a,b,c>",
        "<Idle|MPos:nan,0,0>",
        "<Idle|MPos>",
        "Idle|MPos:0,0,0",
    ],
)
def test_malformed_reports_raise_protocol_error(line: str) -> None:
    with pytest.raises(ProtocolError):
        parse_status(line)


def test_banner_versions() -> None:
    assert parse_banner(GOLDEN_BANNER) == "1.1h"
    with pytest.raises(NotGrblError, match=r"0\.9j is not supported"):
        parse_banner("Grbl 0.9j ['$' for help]")
    with pytest.raises(NotGrblError):
        parse_banner("Marlin 2.1.2")


def test_build_info_golden_and_malformed() -> None:
    info = parse_build_info([GOLDEN_VER, GOLDEN_OPT])
    assert (info.version, info.options, info.planner_blocks, info.rx_buffer_bytes) == (
        "1.1h.20190830", "V", 15, 128)
    assert parse_build_info(["[VER:1.1f.20170801:]"]).rx_buffer_bytes is None
    with pytest.raises(ProtocolError):
        parse_build_info(["[OPT:V,15,128]"])
    with pytest.raises(ProtocolError):
        parse_build_info([GOLDEN_VER, "[OPT:V,x,128]"])


def test_settings_lines() -> None:
    assert parse_setting("$110=500.000") == (110, 500.0)
    assert parse_setting("$0=10") == (0, 10.0)
    with pytest.raises(ProtocolError):
        parse_setting("$x=1")


def test_codes_carry_their_meaning() -> None:
    assert "homing" in GrblError(5).meaning
    assert "alarm or jog" in GrblError(9).meaning
    assert "travel" in GrblError(15).meaning
    assert "G0X1" in str(GrblError(20, "G0X1"))
    assert GrblAlarm(3).position_lost and not GrblAlarm(2).position_lost
    assert set(ALARM_MEANINGS) == set(range(1, 10))
    assert "unknown" in GrblError(99).meaning


def test_significant_length_drops_spaces_and_comments() -> None:
    assert significant_length("G0 X1 (move) Y2 ; comment") == 6
    assert significant_length("g0x1") == 4


def test_rapid_move_time_agrees_with_the_simulator_physics() -> None:
    """Driver and simulator implement the trapezoid independently; they must agree."""
    rates, accels = (600.0, 600.0, 120.0), (50.0, 50.0, 20.0)
    for delta in [(1.0, 0.0, 0.0), (10.0, -3.0, 0.0), (0.0, 0.0, 0.2), (0.3, 0.4, 0.05)]:
        expected = move_time((0.0, 0.0, 0.0), delta, rates, accels)
        assert rapid_move_s(XYZ(*delta), XYZ(*rates), XYZ(*accels)) == pytest.approx(expected)
    # short move: triangle profile, 2*sqrt(d/a)
    assert rapid_move_s(XYZ(1.0, 0, 0), XYZ(*rates), XYZ(*accels)) == pytest.approx(
        2 * math.sqrt(1 / 50))


def test_plan_approach_splits_moves_against_the_preferred_side() -> None:
    backlash = Backlash(AxisBacklash(overshoot_um=50), AxisBacklash(overshoot_um=50),
                        AxisBacklash(enabled=False))
    engaged = (True, True, True)
    # + on X (preferred side) and engaged: direct
    assert plan_approach(XYZ(0, 0, 0), XYZ(100, 0, 0), engaged, backlash) == [XYZ(100, 0, 0)]
    # - on X: overshoot below, then come up; Z disabled goes straight to its target
    assert plan_approach(XYZ(0, 0, 0), XYZ(-100, 0, -5), engaged, backlash) == [
        XYZ(-150, 0, -5), XYZ(-100, 0, -5)]
    # not engaged and a short + move: pre-position too
    assert plan_approach(XYZ(0, 0, 0), XYZ(10, 0, 0), (False, True, True), backlash) == [
        XYZ(-40, 0, 0), XYZ(10, 0, 0)]
    # the run-up is clamped to the travel
    limits = (XYZ(-120, -120, -120), XYZ(0, 0, 0))
    assert plan_approach(XYZ(0, 0, 0), XYZ(-100, 0, 0), engaged, backlash, limits)[0] == XYZ(
        -120, 0, 0)
    reverse = Backlash(AxisBacklash(direction=-1), AxisBacklash(enabled=False),
                       AxisBacklash(enabled=False))
    assert plan_approach(XYZ(0, 0, 0), XYZ(100, 0, 0), engaged, reverse) == [
        XYZ(150, 0, 0), XYZ(100, 0, 0)]


def test_backlash_config_validation() -> None:
    with pytest.raises(ValueError, match="direction"):
        AxisBacklash(direction=0)
    with pytest.raises(ValueError, match="overshoot_um"):
        AxisBacklash(overshoot_um=-1)


@given(st.text(max_size=120))
def test_any_received_line_parses_or_raises_protocol_error(line: str) -> None:
    kind = classify(line)
    assert isinstance(kind, Kind)
    with contextlib.suppress(ProtocolError):
        parse_status(f"<{line}>")


@given(st.text(alphabet="<>|:,.-0123456789IdleRunMPosWCOBfFSPnOvA", max_size=80))
def test_status_like_noise_parses_or_raises_protocol_error(line: str) -> None:
    try:
        status = parse_status(line)
    except ProtocolError:
        return
    assert status.mpos is not None or status.wpos is not None
