"""A minimal WebDriver BiDi driver for Debian's headless Firefox (no geckodriver, no downloads).

Firefox started with ``--remote-debugging-port`` speaks W3C WebDriver BiDi on
``ws://127.0.0.1:PORT/session``; with port 0 it picks a free port and writes it to
``WebDriverBiDiServer.json`` in the profile. Only what tests/test_console_firefox.py uses is here:
tabs and windows, navigation, script evaluation, real key and pointer input, screenshots.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

FIREFOX = Path("/usr/bin/firefox-esr")

PREFS = {
    # no first-run pages, default-browser question, updates or telemetry in a test profile
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "startup.homepage_welcome_url": "about:blank",
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "extensions.update.enabled": False,
    # and no background traffic to anywhere but loopback
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.region.update.enabled": False,
    "browser.newtabpage.enabled": False,
    "dom.push.connection.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",
}

FOCUSED_WINDOW = """() => {
    Document.prototype.hasFocus = function () { return this.visibilityState === "visible"; };
}"""
"""Headless Firefox has no OS window, so ``document.hasFocus()`` is always false there (a page
that refuses to work unfocused never starts). This preload script reports a visible tab as
focused, as a desktop Firefox with its window in front does; Playwright's own Firefox build
patches ``hasFocus`` for the same reason."""

KEYS = {"Space": " ", "Escape": "\ue00c"} | {f"Key{c}": c.lower() for c in "ADEQSW"}
"""``KeyboardEvent.code`` names → WebDriver key values (a US layout gives back the same code)."""

STARTUP_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 10.0


class BidiError(Exception):
    """Firefox answered a command with an error."""


class FirefoxBidi:
    """One headless Firefox in a fresh temporary profile and one BiDi session to it."""

    def __init__(self, executable: Path = FIREFOX, viewport: tuple[int, int] = (1280, 720)) -> None:
        self.executable = executable
        self.viewport = viewport
        self.version = ""
        self._profile: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._socket: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> FirefoxBidi:
        self._profile = Path(tempfile.mkdtemp(prefix="medge-firefox-"))
        (self._profile / "user.js").write_text("".join(
            f"user_pref({json.dumps(name)}, {json.dumps(value)});\n"
            for name, value in PREFS.items()))
        try:
            with (self._profile / "firefox.log").open("wb") as log:
                self._process = await asyncio.create_subprocess_exec(
                    str(self.executable), "--headless", "--no-remote", "-profile",
                    str(self._profile), "--remote-debugging-port", "0", "about:blank",
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            port = await self._bidi_port()
            self._socket = await connect(f"ws://127.0.0.1:{port}/session", ping_interval=None,
                                         max_size=None)
            session = await self.call("session.new", capabilities={})
            self.version = session["capabilities"]["browserVersion"]
            await self.call("script.addPreloadScript", functionDeclaration=FOCUSED_WINDOW)
        except BaseException:
            await self._quit()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self._quit()

    async def _bidi_port(self) -> int:
        assert self._profile is not None and self._process is not None
        announced = self._profile / "WebDriverBiDiServer.json"
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                while True:
                    if self._process.returncode is not None:
                        raise RuntimeError(f"firefox exited with {self._process.returncode}")
                    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                        return int(json.loads(announced.read_text())["ws_port"])
                    await asyncio.sleep(0.02)
        except (RuntimeError, TimeoutError) as error:
            log = (self._profile / "firefox.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{self.executable} did not open WebDriver BiDi within {STARTUP_TIMEOUT_S:.0f} s"
                f" ({error!r}); its output:\n{log}") from error

    async def _quit(self) -> None:
        """Close the browser politely, then make sure the process is gone and the profile too."""
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self.call("browser.close", timeout=QUIT_TIMEOUT_S)
            await self._socket.close()
            self._socket = None
        if self._process is not None:
            if self._process.returncode is None:
                try:
                    await asyncio.wait_for(self._process.wait(), QUIT_TIMEOUT_S)
                except TimeoutError:
                    self._process.kill()
                    await self._process.wait()
            self._process = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    async def call(self, method: str, timeout: float = COMMAND_TIMEOUT_S,
                   **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events are not subscribed to)."""
        if self._socket is None:
            raise BidiError(f"{method}: no BiDi connection")
        async with self._lock, asyncio.timeout(timeout):
            command_id = next(self._ids)
            await self._socket.send(json.dumps({"id": command_id, "method": method,
                                                "params": params}))
            while True:
                message = json.loads(await self._socket.recv())
                if message.get("id") == command_id:
                    break
        if message["type"] == "error":
            raise BidiError(f"{method}: {message['error']}: {message.get('message', '')}")
        result: dict[str, Any] = message["result"]
        return result

    async def first_tab(self) -> Tab:
        tree = await self.call("browsingContext.getTree", maxDepth=0)
        return await self._tab(tree["contexts"][0]["context"])

    async def new_tab(self, window: bool = False) -> Tab:
        """A new tab in front of the current one (hiding it), or in a window of its own."""
        created = await self.call("browsingContext.create", type="window" if window else "tab")
        return await self._tab(created["context"])

    async def _tab(self, context: str) -> Tab:
        width, height = self.viewport
        await self.call("browsingContext.setViewport", context=context,
                        viewport={"width": width, "height": height})
        return Tab(self, context)


class Keyboard:
    """Real key presses: Firefox raises trusted ``keydown``/``keyup`` events, as for a person."""

    def __init__(self, tab: Tab) -> None:
        self.tab = tab

    async def _perform(self, *actions: dict[str, str]) -> None:
        await self.tab.browser.call("input.performActions", context=self.tab.context,
                                    actions=[{"type": "key", "id": "keyboard",
                                              "actions": list(actions)}])

    async def down(self, code: str) -> None:
        """Press and hold until :meth:`up`."""
        await self._perform({"type": "keyDown", "value": KEYS[code]})

    async def up(self, code: str) -> None:
        await self._perform({"type": "keyUp", "value": KEYS[code]})

    async def press(self, code: str) -> None:
        await self._perform({"type": "keyDown", "value": KEYS[code]},
                            {"type": "keyUp", "value": KEYS[code]})


class Tab:
    """One top-level browsing context. ``goto``, ``evaluate``, ``wait_for_selector``,
    ``text_content``, ``click``, ``keyboard`` and ``bring_to_front`` are named and behave like
    Playwright's ``Page`` methods, so the console tests' helpers drive Chromium (Playwright) and
    Firefox (this driver) alike."""

    def __init__(self, browser: FirefoxBidi, context: str) -> None:
        self.browser = browser
        self.context = context
        self.keyboard = Keyboard(self)

    async def goto(self, url: str) -> None:
        await self.browser.call("browsingContext.navigate", context=self.context, url=url,
                                wait="complete")

    async def bring_to_front(self) -> None:
        await self.browser.call("browsingContext.activate", context=self.context)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression, or of calling it when it is a function;
        promises are awaited."""
        reply = await self.browser.call(
            "script.evaluate", target={"context": self.context}, awaitPromise=True,
            expression=f"""(async () => {{
                let value = ({expression});
                if (typeof value === "function") value = value();
                return JSON.stringify(await value);
            }})()""")
        if reply["type"] == "exception":
            raise BidiError(f"{expression}: {reply['exceptionDetails']['text']}")
        value = reply["result"].get("value")
        return None if value is None else json.loads(value)

    async def wait_for_selector(self, selector: str, timeout: float = 30_000) -> None:
        """Until an element matches the CSS selector; ``timeout`` in ms."""
        condition = f"document.querySelector({json.dumps(selector)}) !== null"
        try:
            async with asyncio.timeout(timeout / 1000):
                while not await self.evaluate(condition):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise TimeoutError(f"nothing matched {selector} within {timeout:.0f} ms") from None

    async def text_content(self, selector: str) -> str | None:
        text: str | None = await self.evaluate(
            f"document.querySelector({json.dumps(selector)})?.textContent ?? null")
        return text

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        x, y = await self.evaluate(f"""(() => {{
            const element = document.querySelector({json.dumps(selector)});
            element.scrollIntoView({{block: "nearest"}});
            const box = element.getBoundingClientRect();
            return [Math.round(box.x + box.width / 2), Math.round(box.y + box.height / 2)];
        }})()""")
        await self.browser.call("input.performActions", context=self.context, actions=[{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [{"type": "pointerMove", "x": x, "y": y},
                        {"type": "pointerDown", "button": 0},
                        {"type": "pointerUp", "button": 0}]}])

    async def screenshot(self, path: Path) -> None:
        """The whole page from its top, wherever a click scrolled it to."""
        await self.evaluate("window.scrollTo(0, 0)")  # or the sticky header lands mid-page
        shot = await self.browser.call("browsingContext.captureScreenshot", context=self.context,
                                       origin="document")
        path.write_bytes(base64.b64decode(shot["data"]))
