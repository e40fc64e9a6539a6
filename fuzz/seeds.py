"""Valid inputs per fuzz target, made by the simulators (the independent encoders) or copied
from the reference vectors: the fuzzers mutate from here, so they reach past the first check."""

from __future__ import annotations

import json
import random
import struct
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOMENT = datetime(2026, 11, 22, 1, 0)


def _strip_records(seed: int = 5) -> list[bytes]:
    from firmware_sim import astm_urine, urine_strip

    return astm_urine.strip_message("SN0001", 1, MOMENT, urine_strip.random_strip(
        random.Random(seed)))


def console_request(body: bytes) -> bytes:
    """A setpoint POST as the console page sends it."""
    return (b"POST /api/setpoint HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nX-Console-Token: abc\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def seeds() -> dict[str, list[bytes]]:
    from firmware_sim import (
        astm_urine,
        cms50,
        dynamixel,
        force,
        modbus_vent,
        printout_urine,
        urine_strip,
        uroflow,
    )

    pads = urine_strip.random_strip(random.Random(3))
    vitals = cms50.Vitals(97, 72, 40, True, False, False)
    job = {"barcode": "B1", "accession": "A1", "patient": "P1", "objective": "20x",
           "stain": "HE", "area_mm": [1, 1, 5, 5], "pacs": "hospital", "jpeg_quality": 90}
    return {
        "grbl_line": [b"<Idle|MPos:0.000,0.000,0.000|FS:0,0|WCO:0.000,0.000,0.000>",
                      b"<Run|MPos:1.5,2.25,-0.5|Bf:15,128|FS:500,0|Pn:XZ|Ov:100,100,100>",
                      b"error:9", b"ALARM:1", b"$110=500.000", b"Grbl 1.1h ['$' for help]"],
        "grbl_build_info": [b"[VER:1.1h.20190825:]\n[OPT:V,15,128]\nok"],
        "dynamixel_status": [dynamixel.status_packet(1, 0, b"\x01\x02\xff\xff\xfd"),
                             dynamixel.status_packet(3, 0x80)],
        "astm_frame": astm_urine.build_frames(_strip_records()),
        "astm_message": [b"".join(_strip_records())],
        "printout_report": [  # the bytes between STX and ETX, as the reader hands them over
            printout_urine.consult120_report(pads, MOMENT, 1)[1:-1],
            printout_urine.clinitek50_report(pads, MOMENT, 2, "YEL")[1:-1]],
        "cms50_stream": [cms50.encode_legacy(vitals) * 3, cms50.encode_v46_live(vitals) * 3],
        "modbus_response": [modbus_vent.with_crc(bytes([1, 3, 4, 0, 1, 0, 2])),
                            modbus_vent.with_crc(bytes([1, 0x83, 2]))],
        "uroflow_stream": [uroflow.nmea_line("UFW,123,45.6")
                           + uroflow.nmea_line("UFT,200,20261122010000,SN1,10")],
        "force_line": [force.line("F,12,1500,0")],
        "teleop_payload": [json.dumps({"v": 1, "operator": "op1", "seq": 5, "sent_at": 1.5,
                                       "enable": True, "twist": [0, 0, 0.01, 0, 0, 0]}).encode(),
                           json.dumps({"v": 1, "operator": "op1", "cmd": "home",
                                       "args": {}}).encode()],
        "microscope_job": [json.dumps(job).encode()],
        "ultrasound_live": [b'{"v":1,"published_at":1.0}\n\xff\xd8\xff\xd9'],
        "config": [(REPO / "config" / name).read_bytes()
                   for name in ("gateway.toml", "microscope.toml")],
        "console_settings": [b'{"linear_m_s": 0.05, "deadband": 0.1}'],
        "spacemouse_report": [bytes([1]) + struct.pack("<6h", 100, -100, 350, 0, 5, -350),
                              bytes([3, 1, 0])],
        "console_http": [console_request(b'{"stamp": 1795000000000.5, "axes": [1,0,0,0,0,0]}')],
    }
