"""Property tests over every parser of outside bytes (fuzz/targets.py): any input gives a value
or the parser's typed error — never another exception, a hang or runaway memory. Inputs are
random bytes and mutations of valid inputs made by the simulators (fuzz/seeds.py), so the
mutations reach past the first checks. Bounded example counts keep the set fast; ``make fuzz``
runs the same targets coverage-guided for as long as asked."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.mutate import mutated
from fuzz.seeds import seeds
from fuzz.targets import all_targets

TARGETS = all_targets()
SEEDS = seeds()
MEMORY_LIMIT = 64 * 1024 * 1024
"""Peak allocation allowed for one parse of an input of at most a few kB."""

FAST = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def inputs(name: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(SEEDS[name]))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_has_valid_seeds_that_parse(name: str) -> None:
    """The seeds are valid inputs: a target whose seeds fail would fuzz only its first check."""
    for data in SEEDS[name]:
        TARGETS[name].parse(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_any_input_gives_a_value_or_a_typed_error(name: str) -> None:
    target = TARGETS[name]

    @FAST
    @given(inputs(name))
    def check(data: bytes) -> None:
        target.run(data)

    check()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_large_input_is_parsed_in_bounded_memory(name: str) -> None:
    """A long line of a valid prefix then filler must not make any parser blow up."""
    target = TARGETS[name]
    for filler in (b"\x00", b"9", b"[", b"|", b"\xff"):
        data = SEEDS[name][0][:40] + filler * 20_000
        tracemalloc.start()
        try:
            target.run(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_LIMIT, f"{name}: {peak} bytes for {len(data)} input bytes"
