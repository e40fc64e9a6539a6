"""Hypothesis strategy mutating valid inputs the way a bad line or a hostile sender would:
flipped bytes, cut short, bytes dropped or inserted, pieces duplicated, numbers stretched."""

from __future__ import annotations

from hypothesis import strategies as st

INTERESTING = [b"\x00", b"\xff", b"-", b"9" * 30, b"1e309", b"nan", b"|", b"^", b"\\", b"\r",
               b"\n", b"[", b"{", b'"', b",", b"\x02", b"\x03", b"\x17", b"\xff\xff\xfd\x00"]


@st.composite
def _mutate(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "cut", "drop", "insert", "repeat"]))
        if action == "flip" and where < len(data):
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[where:]
        elif action == "drop":
            del data[where:where + draw(st.integers(1, 8))]
        elif action == "insert":
            data[where:where] = draw(st.sampled_from(INTERESTING) | st.binary(max_size=8))
        else:
            end = min(len(data), where + draw(st.integers(1, 32)))
            data[where:where] = data[where:end] * draw(st.integers(1, 4))
    return bytes(data)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(seeds).flatmap(_mutate)
