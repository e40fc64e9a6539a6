"""The console in real headless Firefox (Debian's firefox-esr, driven over WebDriver BiDi by
tests/bidi.py) against the manipulator daemon, the simulators and a real mosquitto — the same
rig and helpers as the Chromium tests; the simulator's motion log is the witness.

Keys and clicks are real input events; "tab hidden" is a real second tab brought to the front.
Set ``MEDGE_CONSOLE_SCREENSHOTS=docs/console`` to refresh the ``firefox-*.png`` screenshots.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from medge.console.server import ConsoleServer
from medge.localbroker import Mosquitto
from tests.bidi import FIREFOX, FirefoxBidi, Tab
from tests.teleop_rig import Rig, rig
from tests.test_console_browser import (
    RELAXED_WATCHDOG_S,
    arm_and_move_right,
    assert_second_console_is_ignored,
    assert_stops_and_stays_stopped,
    banner,
    console_server,
    release_keys,
)


@contextlib.asynccontextmanager
async def firefox() -> AsyncIterator[FirefoxBidi]:
    """Launched before the rig: starting the browser must not starve the daemon's loop."""
    if not FIREFOX.exists():
        pytest.fail("firefox-esr is not installed: run `make setup` (scripts/setup.sh)")
    async with FirefoxBidi(FIREFOX) as browser:
        yield browser


async def screenshot(tab: Tab, name: str, tmp_path: Path) -> None:
    directory = Path(os.environ.get("MEDGE_CONSOLE_SCREENSHOTS") or tmp_path)
    await tab.screenshot(directory / f"firefox-{name}.png")


@contextlib.asynccontextmanager
async def console(tab: Tab, r: Rig, operator: str,
                  settings_dir: Path) -> AsyncIterator[ConsoleServer]:
    async with console_server(r, operator, settings_dir) as server:
        await tab.goto(server.url)
        await banner(tab, "not-armed")
        yield server


@contextlib.asynccontextmanager
async def alice_console(broker: Mosquitto,
                        tmp_path: Path) -> AsyncIterator[tuple[Rig, Tab, ConsoleServer]]:
    async with firefox() as browser, \
            rig(broker.port, tmp_path, watchdog_s=RELAXED_WATCHDOG_S) as r:
        tab = await browser.first_tab()
        async with console(tab, r, "alice", tmp_path) as server:
            yield r, tab, server


async def test_holding_the_dead_man_key_moves_the_robot_and_releasing_stops_it(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path) as (r, tab, server):
        assert await tab.text_content("#operator") == "alice"
        assert await tab.text_content("#robot") == r.topics.prefix
        assert await tab.text_content("#supervisor-state") == "disarmed"
        await screenshot(tab, "idle", tmp_path)
        await arm_and_move_right(tab, r)
        assert "alice (you)" in (await tab.text_content("#lease") or "")
        assert abs(r.tip()[1]) < 1e-3  # D moves right (+x), nothing else
        await screenshot(tab, "armed-moving", tmp_path)
        await tab.keyboard.up("Space")  # the page sends no "release": setpoints just stop
        released_at = r.sim.clock()
        forwarded = server.counters.forwarded
        await banner(tab, "idle")
        await assert_stops_and_stays_stopped(r, released_at)
        assert server.counters.forwarded - forwarded <= 2  # at most the requests in flight
        await tab.keyboard.up("KeyD")


@pytest.mark.parametrize("latch", ["button", "Escape"])
async def test_the_estop_button_and_escape_latch_the_estop(
        broker: Mosquitto, tmp_path: Path, latch: str) -> None:
    async with alice_console(broker, tmp_path) as (r, tab, _):
        await arm_and_move_right(tab, r)
        if latch == "button":
            await tab.click("#estop")
        else:
            await tab.keyboard.press("Escape")
        await banner(tab, "estop")  # dead-man and D are still held
        latched_at = r.sim.clock()
        await assert_stops_and_stays_stopped(r, latched_at)
        assert "estop_command" in (await tab.text_content("#banner") or "")
        assert r.daemon.state_document()["state"] == "estop"
        if latch == "Escape":
            await screenshot(tab, "estop-latched", tmp_path)
        await release_keys(tab)


async def test_a_second_console_in_another_window_cannot_take_the_lease_or_move_the_robot(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with firefox() as browser, \
            rig(broker.port, tmp_path, watchdog_s=RELAXED_WATCHDOG_S) as r:
        alice_tab, bob_tab = await browser.first_tab(), await browser.new_tab(window=True)
        async with console(alice_tab, r, "alice", tmp_path), \
                console(bob_tab, r, "bob", tmp_path) as bob_server:
            await alice_tab.click("#arm")
            await banner(alice_tab, "idle")
            await bob_tab.click("#arm")
            await bob_tab.wait_for_selector("#message.error", timeout=10_000)
            assert "arm: refused" in (await bob_tab.text_content("#message") or "")
            await assert_second_console_is_ignored(bob_tab, bob_server, r)
            await screenshot(bob_tab, "lease-other", tmp_path)
            await release_keys(bob_tab)


async def test_bringing_another_tab_to_the_front_stops_the_robot_and_says_why(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path) as (r, tab, server):
        await arm_and_move_right(tab, r)
        other = await tab.browser.new_tab()  # a real tab switch: a real visibilitychange
        left_at = r.sim.clock()
        assert await tab.evaluate("document.visibilityState") == "hidden"
        await banner(tab, "hidden")
        forwarded = server.counters.forwarded
        await assert_stops_and_stays_stopped(r, left_at)
        await screenshot(tab, "tab-hidden", tmp_path)
        assert server.counters.forwarded - forwarded <= 2
        await tab.bring_to_front()
        assert await other.evaluate("document.visibilityState") == "hidden"
        await banner(tab, "not-armed")  # the silence outlasted 1 s: the lease lapsed
        await tab.click("#arm")
        # Space and D were never released, but keys held while the tab was hidden are
        # forgotten: the page waits for the dead-man to be pressed again.
        await banner(tab, "idle")
        assert server.counters.forwarded - forwarded <= 2
        await release_keys(tab)


async def test_losing_the_console_server_stops_the_robot_and_says_why(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path) as (r, tab, server):
        await arm_and_move_right(tab, r)
        await server.__aexit__(None, None, None)  # the local server dies mid-motion
        lost_at = r.sim.clock()
        await banner(tab, "link-lost")
        await assert_stops_and_stays_stopped(r, lost_at)
        await screenshot(tab, "link-lost", tmp_path)
        await release_keys(tab)
