"""The console in real headless Chromium (Debian's package, driven by Playwright) against the
manipulator daemon, the simulators and a real mosquitto. The simulator's motion log is the
witness that the robot moved, or did not.

Set ``MEDGE_CONSOLE_SCREENSHOTS=docs/console`` to refresh the screenshots in the docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from daemons.manipulator.registration import RegistrationSection
from daemons.manipulator.supervisor import SupervisorConfig
from daemons.manipulator.ultrasound import UltrasoundSection
from medge.console.server import ConsoleInfo, ConsoleServer
from medge.console.settings import SettingsStore
from medge.localbroker import Mosquitto
from tests.teleop_rig import Rig, rig, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STOP_BUDGET_S = SupervisorConfig().stale_s + SupervisorConfig().stopping_time()
RELAXED_WATCHDOG_S = 1.0
"""The servos' bus watchdog is tested elsewhere; here Chromium shares two busy cores with the
daemon, and a late control cycle must not trip it and hide what the console did
(0.5 s still tripped at start-up with the live ultrasound rendering, at load 8)."""
UI_TIMEOUT_MS = 10_000


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Launched before the rig: starting the browser must not starve the daemon's loop."""
    if not CHROMIUM.exists():
        pytest.fail("chromium is not installed: run `make setup` (scripts/setup.sh)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                   args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def console_server(r: Rig, operator: str, settings_dir: Path) -> AsyncIterator[ConsoleServer]:
    """The operator's console server on the rig (shared with tests/test_console_firefox.py)."""
    async with r.operator(operator) as client, \
            ConsoleServer(client, ConsoleInfo(operator, f"127.0.0.1:{r.broker.port}",
                                              r.topics.prefix),
                          SettingsStore(operator, settings_dir)) as server:
        yield server


@contextlib.asynccontextmanager
async def console(browser: Browser, r: Rig, operator: str, settings_dir: Path,
                  init_script: str | None = None) -> AsyncIterator[tuple[Page, ConsoleServer]]:
    async with console_server(r, operator, settings_dir) as server:
        context = await browser.new_context(viewport={"width": 1280, "height": 720})
        try:
            page = await context.new_page()
            if init_script is not None:
                await page.add_init_script(init_script)
            await page.goto(server.url)
            await banner(page, "not-armed")
            yield page, server
        finally:
            await context.close()


@contextlib.asynccontextmanager
async def alice_console(broker: Mosquitto, tmp_path: Path, init_script: str | None = None,
                        **rig_options: Any) -> AsyncIterator[tuple[Rig, Page, ConsoleServer]]:
    """Chromium, the robot rig and alice's console on it."""
    rig_options.setdefault("watchdog_s", RELAXED_WATCHDOG_S)
    async with chromium() as browser, rig(broker.port, tmp_path, **rig_options) as r, \
            console(browser, r, "alice", tmp_path, init_script) as (page, server):
        yield r, page, server


async def banner(page: Page, reason: str) -> None:
    await page.wait_for_selector(f'#banner[data-reason="{reason}"]', timeout=UI_TIMEOUT_MS)


async def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    directory = Path(os.environ.get("MEDGE_CONSOLE_SCREENSHOTS") or tmp_path)
    viewport = page.viewport_size
    assert viewport is not None
    height = await page.evaluate("document.documentElement.scrollHeight")
    await page.set_viewport_size({"width": viewport["width"], "height": height})  # the whole page
    try:
        await page.screenshot(path=str(directory / f"{name}.png"))
    finally:
        await page.set_viewport_size(viewport)


async def arm_and_move_right(page: Page, r: Rig) -> None:
    await page.click("#arm")
    await banner(page, "idle")
    await page.keyboard.down("Space")
    await page.keyboard.down("KeyD")
    start = r.tip()[0]
    await wait_for(lambda: r.tip()[0] > start + 0.005, timeout=20)  # slow when CPUs are busy
    await banner(page, "moving")


async def release_keys(page: Page) -> None:
    """Let go of the dead-man and D (held by :func:`arm_and_move_right`)."""
    await page.keyboard.up("Space")
    await page.keyboard.up("KeyD")


async def assert_second_console_is_ignored(bob: Page, bob_server: ConsoleServer, r: Rig) -> None:
    """Bob, refused the lease alice holds, holds the dead-man and D: his page says whose lease
    it is, his setpoints reach the daemon, which ignores them (keys left held)."""
    await banner(bob, "lease-other")
    assert "alice" in (await bob.text_content("#banner") or "")
    await bob.keyboard.down("Space")
    await bob.keyboard.down("KeyD")
    since = r.sim.clock()
    await wait_for(lambda: (r.daemon.state_document()["counters"]["foreign"] or 0) > 10)
    assert bob_server.counters.forwarded > 10  # bob's setpoints reached the daemon…
    assert not r.moved_after(since)            # …which ignored them
    assert r.daemon.state_document()["lease"] == "alice"


async def assert_stops_and_stays_stopped(r: Rig, since: float) -> None:
    """No servo moves later than the stale-command timeout plus the decelerating stop."""
    await wait_for(lambda: r.sim.clock() > since + STOP_BUDGET_S + 0.2)
    assert not r.moved_after(since + STOP_BUDGET_S)


async def test_holding_the_dead_man_key_moves_the_robot_and_releasing_stops_it(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path) as (r, page, server):
        assert await page.text_content("#operator") == "alice"
        assert await page.text_content("#broker-link") == "connected"
        # this rig has no ultrasound: the page says so instead of showing an image
        await page.wait_for_selector('#us-view[data-state="none"]', timeout=UI_TIMEOUT_MS)
        assert await page.is_visible("#us-none:has-text('no ultrasound image')")
        assert not await page.is_visible("#us-image")
        await screenshot(page, "idle", tmp_path)
        await arm_and_move_right(page, r)
        band, age_text = await page.evaluate("""() => {
            const age = document.getElementById("command-age");
            return [age.dataset.band, age.textContent];
        }""")
        age_ms = float(age_text.split(" ms")[0])  # the band follows the age shown beside it
        assert band == ("green" if age_ms <= 100 else "amber" if age_ms <= 250 else "red")
        assert "alice (you)" in (await page.text_content("#lease") or "")
        assert abs(r.tip()[1]) < 1e-3  # D moves right (+x), nothing else
        await screenshot(page, "armed-moving", tmp_path)
        moved_to = r.tip()[0]  # a screenshot can stall the page's timers: moving again?
        await wait_for(lambda: r.tip()[0] > moved_to + 0.002)
        await page.keyboard.up("Space")  # the page sends no "release": setpoints just stop
        released_at = r.sim.clock()
        forwarded = server.counters.forwarded
        await banner(page, "idle")
        assert r.moved_after(released_at), "the robot was moving at the release"
        await assert_stops_and_stays_stopped(r, released_at)
        assert server.counters.forwarded - forwarded <= 2  # at most the requests in flight
        await page.keyboard.up("KeyD")

        await banner(page, "not-armed")  # 1 s without setpoints: the lease lapsed
        await page.click("#arm")
        await banner(page, "idle")
        await page.click("#goto")  # "home": the daemon drives there while the dead-man is held
        await page.wait_for_selector("#mode:has-text('going to home')", timeout=UI_TIMEOUT_MS)
        away = r.tip()[0]
        assert away > 0.005
        await page.keyboard.down("Space")
        await wait_for(lambda: r.tip()[0] < away / 2)  # heading back to x = 0
        await page.keyboard.up("Space")


async def test_escape_latches_the_estop_and_reset_needs_confirmation_and_rearming(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path) as (r, page, _):
        await arm_and_move_right(page, r)
        await page.keyboard.press("Escape")  # dead-man and D stay held
        await banner(page, "estop")
        latched_at = r.sim.clock()
        await assert_stops_and_stays_stopped(r, latched_at)
        assert "estop_command" in (await page.text_content("#banner") or "")
        await screenshot(page, "estop-latched", tmp_path)

        page.once("dialog", lambda dialog: dialog.dismiss())
        await page.click("#reset")
        await page.click("#disarm")  # a request after the dismissed one: replies arrive in order
        await page.wait_for_selector("#message:has-text('disarm')", timeout=UI_TIMEOUT_MS)
        assert r.daemon.state_document()["state"] == "estop"

        page.once("dialog", lambda dialog: dialog.accept())
        await page.click("#reset")
        await banner(page, "not-armed")  # reset leaves it disarmed: no motion with keys held
        reset_at = r.sim.clock()
        await assert_stops_and_stays_stopped(r, reset_at)
        await release_keys(page)


async def test_a_second_console_cannot_take_the_lease_or_move_the_robot(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with chromium() as browser, \
            rig(broker.port, tmp_path, watchdog_s=RELAXED_WATCHDOG_S) as r, \
            console(browser, r, "alice", tmp_path) as (alice, _), \
            console(browser, r, "bob", tmp_path) as (bob, bob_server):
        await alice.click("#arm")
        await banner(alice, "idle")
        await bob.click("#arm")
        await bob.wait_for_selector("#message.error:has-text('arm: refused')",
                                    timeout=UI_TIMEOUT_MS)
        await assert_second_console_is_ignored(bob, bob_server, r)
        await release_keys(bob)


# Headless Chromium has no window to minimise or leave: the tests report the tab hidden or the
# window unfocused the way the browser does (state + event); the page's own handlers do the rest.
HIDE = """() => {
    Object.defineProperty(document, "visibilityState", {value: "hidden", configurable: true});
    document.dispatchEvent(new Event("visibilitychange"));
}"""
SHOW = """() => {
    delete document.visibilityState;
    document.dispatchEvent(new Event("visibilitychange"));
}"""
BLUR = """() => window.dispatchEvent(new Event("blur"))"""
FOCUS = """() => window.dispatchEvent(new Event("focus"))"""


@pytest.mark.parametrize(("leave", "come_back", "reason"),
                         [(HIDE, SHOW, "hidden"), (BLUR, FOCUS, "blur")], ids=["hidden", "blur"])
async def test_leaving_the_tab_stops_the_robot_and_says_why(
        broker: Mosquitto, tmp_path: Path, leave: str, come_back: str, reason: str) -> None:
    async with alice_console(broker, tmp_path) as (r, page, server):
        await arm_and_move_right(page, r)
        await page.evaluate(leave)
        left_at = r.sim.clock()
        await banner(page, reason)
        forwarded = server.counters.forwarded
        await assert_stops_and_stays_stopped(r, left_at)
        assert server.counters.forwarded - forwarded <= 2
        await page.evaluate(come_back)
        await banner(page, "not-armed")  # the silence outlasted 1 s: the lease lapsed
        await page.click("#arm")
        # Space and D were never released, but keys held while away are forgotten (their keyup
        # may never come): the page waits for the dead-man to be pressed again.
        await banner(page, "idle")
        assert server.counters.forwarded - forwarded <= 2
        await release_keys(page)


FAKE_GAMEPAD = """
    window.fakePad = {connected: true, axes: [0, 0, 0, 0],
                      buttons: Array.from({length: 17}, () => ({value: 0, pressed: false}))};
    navigator.getGamepads = () => [window.fakePad];
"""
"""A standard-mapping gamepad the test moves (headless Chromium has no gamepad of its own)."""


async def test_gamepad_trigger_drives_and_losing_the_console_server_stops_the_robot(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path, FAKE_GAMEPAD) as (r, page, server):
        await page.click("#arm")
        await banner(page, "idle")
        await page.evaluate("() => { fakePad.axes[0] = 1; }")  # stick right, trigger not held
        await banner(page, "idle")
        assert server.counters.forwarded == 0
        await page.evaluate("() => { fakePad.buttons[7].value = 1; }")  # the dead-man
        await wait_for(lambda: r.tip()[0] > 0.005)
        await banner(page, "moving")
        assert abs(r.tip()[1]) < 1e-3
        await server.__aexit__(None, None, None)  # the local server dies mid-motion
        lost_at = r.sim.clock()
        await banner(page, "link-lost")
        await assert_stops_and_stays_stopped(r, lost_at)


async def test_a_gamepad_trigger_held_through_a_stop_counts_only_once_let_go(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path, FAKE_GAMEPAD) as (r, page, server):
        await page.click("#arm")
        await banner(page, "idle")
        await page.evaluate("() => { fakePad.axes[0] = 1; fakePad.buttons[7].value = 1; }")
        await wait_for(lambda: r.tip()[0] > 0.003, timeout=20)
        await page.evaluate(BLUR)
        left_at = r.sim.clock()
        await banner(page, "blur")
        await page.evaluate(FOCUS)
        await banner(page, "not-armed")  # the lease lapsed meanwhile
        await page.click("#arm")
        await banner(page, "idle")  # trigger still pulled: it does not count until let go
        forwarded = server.counters.forwarded
        await assert_stops_and_stays_stopped(r, left_at)
        assert server.counters.forwarded == forwarded
        await page.evaluate("() => { fakePad.buttons[7].value = 0; }")
        await page.wait_for_function("() => !triggerLatched", timeout=UI_TIMEOUT_MS)
        await page.evaluate("() => { fakePad.buttons[7].value = 1; }")  # pulled again
        moved_from = r.tip()[0]
        await wait_for(lambda: r.tip()[0] > moved_from + 0.003, timeout=20)
        await banner(page, "moving")


@pytest.mark.slow
async def test_registration_started_from_the_page_shows_the_patient_surface(
        broker: Mosquitto, tmp_path: Path) -> None:
    brisk = SupervisorConfig(pose_gain=6.0, max_linear_speed=0.1, max_angular_speed=1.0,
                             workspace_margin_m=0.02)
    registration = RegistrationSection(camera="simulated")
    async with alice_console(broker, tmp_path, supervisor=brisk,
                             registration=registration) as (_, page, _):
        await page.click("#arm")
        await banner(page, "idle")
        await page.keyboard.down("Space")  # the daemon drives the views while it is held
        await page.click("#register")
        await page.wait_for_selector("#registration:has-text('ok · residual')", timeout=150_000)
        await page.wait_for_function("surface.length > 100", timeout=UI_TIMEOUT_MS)
        await page.keyboard.up("Space")
        await banner(page, "idle")
        await screenshot(page, "registered", tmp_path)


async def test_broker_restart_stops_the_robot_then_the_page_reconnects_and_rearms(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path) as (r, page, server):
        await arm_and_move_right(page, r)
        await asyncio.to_thread(broker.stop)  # the broker restarts: every link is cut
        cut_at = r.sim.clock()
        await banner(page, "broker-lost")
        assert "broker link lost — reconnecting" in (await page.text_content("#banner") or "")
        assert await page.is_disabled("#arm") and await page.is_disabled("#goto")
        assert await page.is_enabled("#estop")  # always there, even when it cannot get through
        forwarded = server.counters.forwarded
        await assert_stops_and_stays_stopped(r, cut_at)  # the daemon's stale-command rule
        await screenshot(page, "broker-lost", tmp_path)
        assert server.counters.forwarded == forwarded  # Space and D still held: nothing sent

        await asyncio.to_thread(broker.start)
        await banner(page, "not-armed")  # back, and the robot dropped the lease after 1 s
        assert "reconnected 1×" in (await page.text_content("#broker-link") or "")
        assert await page.is_enabled("#arm")
        await page.click("#arm")
        await banner(page, "idle")  # keys held through the outage were forgotten
        assert server.counters.forwarded == forwarded and not r.moved_after(cut_at + STOP_BUDGET_S)
        await release_keys(page)
        await page.keyboard.down("Space")  # pressed again: the operator drives again
        await page.keyboard.down("KeyD")
        moved_from = r.tip()[0]
        await wait_for(lambda: r.tip()[0] > moved_from + 0.003, timeout=20)
        await banner(page, "moving")
        await release_keys(page)


LIVE_ULTRASOUND = UltrasoundSection(resolution=(320, 240), frame_rate_hz=15.0, live_rate_hz=10.0)
"""The daemon's simulated scanner (phantom seen from its measured pose), small and slow enough
for two busy cores."""

SHOWN = """() => {
    const age = document.getElementById("us-age");
    const image = document.getElementById("us-image");
    return {seq: Number(image.dataset.seq), width: image.naturalWidth, band: age.dataset.band,
            age: age.textContent, pose: document.getElementById("us-pose").textContent,
            force: document.getElementById("us-force").textContent};
}"""


async def test_the_live_ultrasound_image_is_shown_with_its_age_pose_and_force(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with alice_console(broker, tmp_path, ultrasound=LIVE_ULTRASOUND) as (r, page, server):
        scanner = r.daemon.ultrasound
        assert scanner is not None
        await page.wait_for_selector('#us-view[data-state="live"]', timeout=UI_TIMEOUT_MS)
        await page.click("#arm")
        await banner(page, "idle")
        await page.keyboard.down("Space")
        await page.keyboard.down("KeyE")  # lower the probe onto the phantom: echoes appear
        await wait_for(lambda: r.world.contact_force()[0] > 4.0, timeout=30)
        await page.keyboard.up("KeyE")
        await page.wait_for_function(  # a frame taken in contact, as the page shows it
            "() => parseFloat(document.getElementById('us-force').textContent) > 3",
            timeout=UI_TIMEOUT_MS)
        shown = await page.evaluate(SHOWN)
        assert shown["width"] == 320  # the daemon's frame, decoded by the browser
        assert 1 <= shown["seq"] <= scanner.live_sent
        age_ms = float(shown["age"].split(" ms")[0])
        assert shown["band"] == ("green" if age_ms <= 100 else "amber" if age_ms <= 250 else "red")
        assert shown["pose"].startswith("tip ") and float(shown["force"].split(" N")[0]) > 3
        await screenshot(page, "live-ultrasound", tmp_path)
        await page.keyboard.up("Space")

        # a 2 fps display takes the newest frame twice a second and skips the others
        await page.fill("#us-fps", "2")
        await page.click("#save-settings")
        await page.wait_for_selector("#message:has-text('settings saved')", timeout=UI_TIMEOUT_MS)
        served, skipped, started = server.live.served, server.live.skipped, time.monotonic()
        await asyncio.sleep(3.0)  # a measuring window, not a wait for an event
        rate = (server.live.served - served) / (time.monotonic() - started)
        assert rate <= 2.5 and server.live.skipped - skipped >= 10

        scanner.publish = None  # the live view stops arriving
        await page.wait_for_selector('#us-view[data-state="none"]', timeout=UI_TIMEOUT_MS)
        assert "no ultrasound image" in (await page.text_content("#us-none") or "")
        assert await page.text_content("#us-age") == "no image"
