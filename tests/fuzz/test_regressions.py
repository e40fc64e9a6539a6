"""Regression tests for what the fuzzers found (docs/reliability.md, "Defects found and fixed")."""

from __future__ import annotations

import pytest

from daemons.microscope.jobs import JobError, parse_spec
from drivers import cms50
from firmware_sim import cms50 as cms50_sim
from medge.console.server import HttpError, parse_head

VITALS = cms50_sim.Vitals(97, 72, 40, True, False, False)


def test_cms50_framers_skip_a_megabyte_of_garbage_in_one_pass() -> None:
    """Found by the memory/size property: both framers dropped garbage one byte at a time from
    the front of a bytearray (quadratic): 200 kB took 3.4 s, 1 MB about 90 s — a noisy line
    (wrong baud rate) could starve the event loop. Now one cut per feed; the valid frame after
    the garbage still comes out (resynchronisation)."""
    for garbage in (b"\x00" * 400_000, b"\xff" * 400_000):
        legacy, v46 = cms50.LegacyFramer(), cms50.V46Framer()
        packets = legacy.feed(garbage + cms50_sim.encode_legacy(VITALS) * 2)
        frames = v46.feed(garbage + cms50_sim.encode_v46_live(VITALS) * 2)
        assert packets[-1] == cms50_sim.encode_legacy(VITALS)
        assert frames[-1] == cms50_sim.encode_v46_live(VITALS)
        assert legacy.discarded >= len(garbage) - 5 and v46.discarded >= len(garbage) - 9


@pytest.mark.parametrize("field", ["stain", "objective"])
@pytest.mark.parametrize("value", [{"barcode": " 0"}, ["HE"], None, 20])
def test_microscope_job_names_a_stain_or_objective_of_the_wrong_type(field: str,
                                                                     value: object) -> None:
    """Found by atheris (make fuzz): ``"stain": {…}`` raised TypeError (unhashable) instead of
    the JobError naming the field; the daemon answered "malformed request: unhashable type"."""
    job = {"barcode": "B1", "accession": "A1", "patient": "P1", "objective": "20x",
           field: value}
    with pytest.raises(JobError) as raised:
        parse_spec(job, {"20x"}, set())
    assert raised.value.field == field


def _head(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n"


@pytest.mark.parametrize("target", [b"//[x", b"http://[::1/api/state"])
def test_console_request_with_a_target_urlsplit_rejects_is_a_400(target: bytes) -> None:
    """Found while writing the console_http fuzz target: ``urlsplit`` raises a bare ValueError
    on a malformed IPv6 authority, which escaped the server's HttpError handling (no reply, an
    unhandled exception in the connection task). Now the request is answered with 400."""
    with pytest.raises(HttpError) as refused:
        parse_head(_head(target))
    assert refused.value.status == 400 and "request target" in refused.value.message
    request, length = parse_head(_head(b"/api/state?x=%zz&y"))  # odd but harmless: parsed
    assert (request.path, length) == ("/api/state", 0)
