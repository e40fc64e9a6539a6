// medge teleoperation console (docs/console.md). Plain JS, no build step.
//
// Safety model: while the dead-man (Space, or the gamepad's right trigger) is held and the tab is
// visible, focused and connected, the page POSTs a setpoint every SEND_PERIOD_MS. It never sends
// a "release": when anything goes wrong the setpoints simply stop and the robot's supervisor
// brings it to rest. The page shows why motion stopped. Whenever sending stops for a reason
// (tab hidden, focus lost, broker link lost), held keys are forgotten and a held gamepad trigger
// must be let go: coming back never resumes a motion by itself.
"use strict";

const SEND_PERIOD_MS = 20;          // 50 Hz
const EVENTS_SILENT_MS = 500;       // no state event for this long = link to the console lost
const ROBOT_SILENT_MS = 500;        // no robot state for this long = broker or daemon gone
const AGE_GREEN_MS = 100, AGE_AMBER_MS = 250;
const US_SILENT_MS = 2000;          // no ultrasound frame for this long = "no ultrasound image"
const MOTION_CONTROLS = ["arm", "disarm", "reset", "pose", "goto", "register", "fine"];
const KEY_AXES = {                  // probe frame: x right, y forward, z up (out of the patient)
  KeyD: [0, 1], KeyA: [0, -1], KeyW: [1, 1], KeyS: [1, -1], KeyQ: [2, 1], KeyE: [2, -1],
  ArrowUp: [3, 1], ArrowDown: [3, -1], ArrowRight: [4, 1], ArrowLeft: [4, -1],
};
const DEADMAN_KEY = "Space";

const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const held = new Set();
let latest = null;                  // the last server event
let lastEventAt = -Infinity;
let linkDown = true;
let focusLost = !document.hasFocus();
let inFlight = 0;
let rttMs = null;
let sentCount = 0;
let surface = [];
let surfaceFor = null;              // registration "at" the surface belongs to
let brokerUp = true;                // the console server's MQTT link, as last reported
let triggerLatched = false;         // the gamepad trigger must be released before it counts again
let usShown = null;                 // the ultrasound frame on screen: {header, at}
let usFetching = false;
let usTimer = null;

// --- server link -----------------------------------------------------------------------------

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json", "X-Console-Token": token },
    body: JSON.stringify(body), cache: "no-store",
  });
  const document_ = await response.json();
  if (!response.ok) throw new Error(document_.error || `HTTP ${response.status}`);
  return document_;
}

async function get(path) {
  const response = await fetch(path, { headers: { "X-Console-Token": token }, cache: "no-store" });
  const document_ = await response.json();
  if (!response.ok) throw new Error(document_.error || `HTTP ${response.status}`);
  return document_;
}

function connectEvents() {
  const source = new EventSource(`/events?token=${encodeURIComponent(token)}`);
  source.onmessage = (event) => {
    latest = JSON.parse(event.data);
    lastEventAt = performance.now();
    linkDown = false;
    const up = latest.broker_link.up;
    if (brokerUp && !up) releaseAll();
    brokerUp = up;
    render();
  };
  source.onerror = () => { linkDown = true; render(); };  // EventSource reconnects by itself
}

// --- input -----------------------------------------------------------------------------------

function gamepad() {
  for (const pad of (navigator.getGamepads ? navigator.getGamepads() : [])) {
    if (pad && pad.connected) return pad;
  }
  return null;
}

function inputAxes() {
  const axes = [0, 0, 0, 0, 0, 0];
  for (const code of held) {
    const mapping = KEY_AXES[code];
    if (mapping) axes[mapping[0]] += mapping[1];
  }
  const pad = gamepad();
  if (pad) {
    const axis = (i) => (pad.axes.length > i ? pad.axes[i] : 0);
    const pressed = (i) => (pad.buttons.length > i ? pad.buttons[i].value : 0);
    axes[0] += axis(0); axes[1] -= axis(1); axes[4] += axis(2); axes[3] -= axis(3);
    axes[2] += pressed(4) - pressed(5);
  }
  return axes.map((v) => Math.max(-1, Math.min(1, v)));
}

function deadmanHeld() {
  const pad = gamepad();
  const trigger = Boolean(pad && pad.buttons.length > 7 && pad.buttons[7].value > 0.5);
  if (!trigger) triggerLatched = false;
  return held.has(DEADMAN_KEY) || (trigger && !triggerLatched);
}

// Why setpoints may not be sent right now (null = they may).
function blocker() {
  if (document.visibilityState !== "visible") return ["hidden", "Motion stopped: the console tab is hidden"];
  if (focusLost) return ["blur", "Motion stopped: the console window lost focus — click it to continue"];
  if (linkDown || performance.now() - lastEventAt > EVENTS_SILENT_MS)
    return ["link-lost", "Motion stopped: connection to the console server lost"];
  if (!brokerUp)
    return ["broker-lost", "Motion stopped: broker link lost — reconnecting (setpoints cannot reach the robot; "
      + "arm again once it is back if the robot dropped the lease)"];
  const age = latest && latest.robot_state_age_ms;
  if (!latest || !latest.robot || age === null || age > ROBOT_SILENT_MS)
    return ["robot-silent", "Motion stopped: no state from the robot (broker or daemon unreachable)"];
  return null;
}

function tick() {
  if (!deadmanHeld() || blocker() !== null || inFlight >= 2) return;
  const started = performance.now();
  inFlight += 1;
  post("/api/setpoint", { stamp: performance.timeOrigin + started, axes: inputAxes() })
    .then((reply) => { if (reply.ok) sentCount += 1; rttMs = performance.now() - started; })
    .catch((error) => showMessage(`setpoint: ${error.message}`, true))
    .finally(() => { inFlight -= 1; });
}

function releaseAll() {
  held.clear();  // keyup events are lost while unfocused: never resume on a stale key state
  triggerLatched = true;
  render();
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  if (event.code === "Escape") { event.preventDefault(); estop(); return; }
  if (event.code === DEADMAN_KEY || KEY_AXES[event.code]) {
    event.preventDefault();
    held.add(event.code);
  }
});
document.addEventListener("keyup", (event) => { held.delete(event.code); });
document.addEventListener("visibilitychange", () => releaseAll());
window.addEventListener("blur", () => { focusLost = true; releaseAll(); });
window.addEventListener("focus", () => { focusLost = false; render(); });

// --- commands --------------------------------------------------------------------------------

function showMessage(text, error = false) {
  const element = $("message");
  element.textContent = text;
  element.className = error ? "message error" : "message";
}

async function command(body, label) {
  try {
    const reply = await post("/api/command", body);
    showMessage(`${label}: ${reply.ok ? "done" : "refused"} (${reply.reason})`, !reply.ok);
    return reply;
  } catch (error) {
    showMessage(`${label}: ${error.message}`, true);
    return null;
  }
}

function estop() { command({ cmd: "estop" }, "E-stop"); }

$("estop").addEventListener("click", estop);
$("arm").addEventListener("click", () => command({ cmd: "arm" }, "arm"));
$("disarm").addEventListener("click", () => command({ cmd: "disarm" }, "disarm"));
$("reset").addEventListener("click", () => {
  if (confirm("Reset the E-stop? Make sure the cause is cleared and the patient is safe. "
              + "The robot stays disarmed until you arm it again.")) {
    command({ cmd: "reset" }, "reset");
  }
});
$("goto").addEventListener("click", () => command({ cmd: "goto", pose: $("pose").value },
                                                  `go to ${$("pose").value}`));
$("register").addEventListener("click", () => {
  showMessage("registration running — hold the dead-man while the robot visits its poses");
  command({ cmd: "register" }, "registration");
});
$("fine").addEventListener("change", (event) => command(
  { cmd: "mode", mode: event.target.checked ? "fine" : "normal" }, "mode"));

// --- settings --------------------------------------------------------------------------------

function showSettings(reply) {
  const s = reply.settings;
  $("settings-user").textContent = reply.user;
  $("deadband").value = s.deadband;
  $("us-fps").value = s.us_display_hz;
  pullUltrasoundAt(s.us_display_hz);
  $("linear").value = s.linear_m_s;
  $("angular").value = s.angular_rad_s;
  for (const box of document.querySelectorAll("[data-axis]")) box.checked = s.invert[box.dataset.axis];
}

$("save-settings").addEventListener("click", async () => {
  const invert = {};
  for (const box of document.querySelectorAll("[data-axis]")) invert[box.dataset.axis] = box.checked;
  try {
    showSettings(await post("/api/settings", {
      deadband: Number($("deadband").value), linear_m_s: Number($("linear").value),
      angular_rad_s: Number($("angular").value), invert, us_display_hz: Number($("us-fps").value),
    }));
    showMessage("settings saved");
  } catch (error) { showMessage(`settings: ${error.message}`, true); }
});

async function refreshSurface(registration) {
  const key = registration && registration.at;
  if (surfaceFor === key) return;
  surfaceFor = key;
  try {
    const reply = await get("/api/surface");
    if (reply.ok) surface = reply.detail.points;
  } catch (error) { surfaceFor = null; }
}

// --- drawing ---------------------------------------------------------------------------------

function band(ageMs) {
  if (ageMs === null || ageMs === undefined) return "none";
  return ageMs <= AGE_GREEN_MS ? "green" : ageMs <= AGE_AMBER_MS ? "amber" : "red";
}

function bannerFor(robot, operator) {
  const blocked = blocker();
  if (blocked && (blocked[0] === "link-lost" || blocked[0] === "broker-lost"))
    return [blocked[0], "alarm", blocked[1]];  // the robot state shown is no longer current
  if (robot && robot.state === "estop")
    return ["estop", "alarm", `E-STOP latched (${robot.reasons.join(", ")}) — reset, then arm again`];
  if (blocked) return [blocked[0], "alarm", blocked[1]];
  if (robot.state !== "armed") return ["not-armed", "stopped", "Disarmed — press Arm to take the lease"];
  if (robot.lease !== operator) return ["lease-other", "stopped", `The lease is held by ${robot.lease}`];
  if (!deadmanHeld()) return ["idle", "stopped", "Armed — hold Space (or the gamepad trigger) to move"];
  if (robot.moving) return ["moving", "moving", "Moving — release Space to stop"];
  return ["held", "stopped", `Dead-man held; not moving (${robot.reasons.join(", ")})`];
}

function render() {
  const event = latest;
  const robot = event && event.robot;
  const console_ = event ? event.console : null;
  if (console_) {
    $("operator").textContent = console_.operator;
    $("broker").textContent = console_.broker;
    $("robot").textContent = console_.robot;
    const select = $("pose");
    if (select.options.length !== console_.poses.length) {
      select.replaceChildren(...console_.poses.map((name) => new Option(name, name)));
    }
  }
  const [reason, kind, text] = event ? bannerFor(robot, console_.operator)
    : ["link-lost", "alarm", "Connecting to the console server…"];
  const banner = $("banner");
  banner.dataset.reason = reason;
  // what the robot did last, greyed: no longer current while its state cannot reach us
  document.body.dataset.robotStale = String(["link-lost", "broker-lost", "robot-silent"].includes(reason));
  banner.className = `banner ${kind}`;
  banner.textContent = text;
  $("link").textContent = linkDown ? "lost" : `${rttMs === null ? "—" : rttMs.toFixed(1) + " ms"} round trip, `
    + `${sentCount} setpoints sent, robot state ${event && event.robot_state_age_ms !== null ? event.robot_state_age_ms.toFixed(0) + " ms old" : "none"}`;
  if (event) renderBrokerLink(event.broker_link);
  renderUltrasound(event && event.us);
  if (event && event.spacemouse) {
    const m = event.spacemouse;
    $("spacemouse").textContent = m.error ? `${m.path}: ${m.error}`
      : `${m.path}: ${m.axes.map((v) => v.toFixed(2)).join(" ")}`;
  }
  if (!robot) return;
  $("supervisor-state").textContent = robot.state + (robot.moving ? " · moving" : "");
  $("reasons").textContent = robot.reasons.join(", ");
  $("lease").textContent = robot.lease === null ? "nobody"
    : robot.lease + (robot.lease === console_.operator ? " (you)" : "");
  const registration = robot.registration || { state: "unknown" };
  $("registration").textContent = registration.state
    + (registration.residual_mm !== undefined
      ? ` · residual ${registration.residual_mm} mm / ${registration.residual_deg}°` : "");
  if (registration.state === "ok") refreshSurface(registration);
  const age = $("command-age");
  age.dataset.band = band(robot.command_age_ms);
  age.textContent = robot.command_age_ms === null ? "no setpoint"
    : `${robot.command_age_ms.toFixed(0)} ms · speed ×${robot.speed_scale}`;
  $("mode").textContent = robot.mode + (robot.goal ? ` · going to ${robot.goal}` : "");
  drawForce(robot.force_n, console_.force_warn_n, console_.force_stop_n);
  drawViews(robot);
}

function renderBrokerLink(link) {
  const cell = $("broker-link");
  cell.dataset.up = String(link.up);
  cell.textContent = link.up
    ? `connected${link.connections > 1 ? ` (reconnected ${link.connections - 1}×)` : ""}`
    : `lost ${(link.down_ms / 1000).toFixed(1)} s ago — reconnecting${link.error ? ` (${link.error})` : ""}`;
  for (const id of MOTION_CONTROLS) $(id).disabled = !link.up;  // E-stop stays available
}

// --- live ultrasound image -------------------------------------------------------------------
// The server keeps only the newest frame; the page fetches it at the user's display rate when a
// new one is there and no fetch is running, so a slow page skips frames and never queues them.

function pullUltrasoundAt(hz) {
  if (usTimer !== null) clearInterval(usTimer);
  usTimer = setInterval(pullUltrasound, 1000 / hz);
}

function ultrasoundSilent(frame) {
  return !frame || frame.received_age_ms + (performance.now() - lastEventAt) > US_SILENT_MS;
}

async function pullUltrasound() {
  const frame = latest && latest.us && latest.us.frame;
  if (usFetching || ultrasoundSilent(frame) || (usShown && usShown.header.seq === frame.seq)) return;
  usFetching = true;
  try {
    const response = await fetch("/api/us/frame", { headers: { "X-Console-Token": token }, cache: "no-store" });
    if (!response.ok) return;
    const header = JSON.parse(response.headers.get("X-Us-Frame"));
    const url = URL.createObjectURL(await response.blob());
    const image = $("us-image");
    const previous = image.src;
    image.src = url;
    await image.decode();
    if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
    usShown = { header, at: performance.now() };
    image.dataset.seq = String(header.seq);
  } catch (error) {
    // a torn or undecodable frame: the next pull fetches a newer one
  } finally {
    usFetching = false;
  }
}

function renderUltrasound(us) {
  const frame = us && us.frame;
  const live = usShown !== null && !ultrasoundSilent(frame);
  $("us-view").dataset.state = live ? "live" : "none";
  const age = $("us-age");
  if (us) $("us-counts").textContent = `${us.received} received, ${us.skipped} skipped, ${us.refused} refused`;
  if (!live) {
    age.dataset.band = "none";
    age.textContent = "no image";
    $("us-none").textContent = frame ? `no ultrasound image (last frame ${(frame.received_age_ms / 1000).toFixed(1)} s ago)`
      : "no ultrasound image";
    return;
  }
  const header = usShown.header;
  const ageMs = header.age_ms + (performance.now() - usShown.at);  // capture → now
  age.dataset.band = band(ageMs);
  age.textContent = `${ageMs.toFixed(0)} ms old`;
  const pose = header.pose;
  $("us-pose").textContent = pose === null ? "pose unknown"
    : `tip ${pose.tip.map((c) => (c * 1000).toFixed(1)).join(", ")} mm · tilt `
      + `${pose.tilt.map((a) => (a * 180 / Math.PI).toFixed(1)).join(", ")}°`;
  $("us-force").textContent = header.force_n === null ? "—" : `${header.force_n.toFixed(1)} N`;
}

function drawForce(force, warn, stop) {
  const canvas = $("force-gauge");
  const g = canvas.getContext("2d");
  const full = stop * 1.25, w = canvas.width - 20, x0 = 10, y0 = 8, h = 22;
  const at = (n) => x0 + Math.max(0, Math.min(1, n / full)) * w;
  g.clearRect(0, 0, canvas.width, canvas.height);
  for (const [from, to, color] of [[0, warn, "#cfe8d6"], [warn, stop, "#f6dfb0"], [stop, full, "#f2c1bb"]]) {
    g.fillStyle = color;
    g.fillRect(at(from), y0, at(to) - at(from), h);
  }
  g.fillStyle = "#1d2433";
  g.font = "11px system-ui";
  for (const [n, label] of [[warn, `warn ${warn} N`], [stop, `stop ${stop} N`]]) {
    g.fillRect(at(n) - 1, y0 - 2, 2, h + 4);
    g.fillText(label, at(n) - 20, y0 + h + 14);
  }
  $("force").textContent = force === null ? "sensor silent" : `${force.toFixed(1)} N`;
  if (force !== null) {
    g.fillStyle = force >= stop ? "#c0392b" : force >= warn ? "#b7791f" : "#1b7f3b";
    g.fillRect(x0, y0 + 6, at(force) - x0, h - 12);
  }
}

function drawViews(robot) {
  const canvas = $("views");
  const g = canvas.getContext("2d");
  const half = canvas.width / 2;
  g.clearRect(0, 0, canvas.width, canvas.height);
  const tip = robot.pose.tip, tilt = robot.pose.tilt, target = robot.commanded.tip;
  const axis = [-Math.sin(tilt[1]), Math.sin(tilt[0]) * Math.cos(tilt[1]), -Math.cos(tilt[0]) * Math.cos(tilt[1])];
  const points = surface.length ? surface : [];
  const xs = points.map((p) => p[0]).concat([tip[0], -0.12, 0.12]);
  const ys = points.map((p) => p[1]).concat([tip[1], -0.12, 0.12]);
  const zs = points.map((p) => p[2]).concat([tip[2], tip[2] - 0.08 * axis[2], -0.3, -0.05]);
  const span = (values) => [Math.min(...values), Math.max(...values)];
  const views = [
    { title: "side (x–z)", u: 0, v: 2, box: [span(xs), span(zs)], left: 0 },
    { title: "top (x–y)", u: 0, v: 1, box: [span(xs), span(ys)], left: half },
  ];
  for (const view of views) {
    const [[u0, u1], [v0, v1]] = view.box;
    const scale = Math.min((half - 40) / (u1 - u0 || 1), (canvas.height - 50) / (v1 - v0 || 1));
    const px = (p) => view.left + 20 + (p[view.u] - u0) * scale;
    const py = (p) => canvas.height - 20 - (p[view.v] - v0) * scale;
    g.strokeStyle = "#d5dae3";
    g.strokeRect(view.left + 8, 8, half - 16, canvas.height - 16);
    g.strokeStyle = "#eef1f6";
    for (let c = Math.ceil(u0 / 0.05) * 0.05; c <= u1; c += 0.05) {
      const x = px([c, 0, 0]);  // both views have x across
      g.beginPath(); g.moveTo(x, 12); g.lineTo(x, canvas.height - 12); g.stroke();
    }
    for (let c = Math.ceil(v0 / 0.05) * 0.05; c <= v1; c += 0.05) {
      const p = [0, 0, 0]; p[view.v] = c;
      g.beginPath(); g.moveTo(view.left + 12, py(p)); g.lineTo(view.left + half - 12, py(p)); g.stroke();
    }
    g.fillStyle = "#5b6475";
    g.font = "12px system-ui";
    g.fillText(`${view.title} · grid 5 cm`, view.left + 16, 24);
    g.fillStyle = "#e0a96d";
    for (const p of points) g.fillRect(px(p) - 1, py(p) - 1, 2, 2);
    g.fillStyle = "#9aa3b5";
    g.beginPath(); g.arc(px(target), py(target), 4, 0, 2 * Math.PI); g.fill();
    const back = tip.map((c, i) => c - 0.08 * axis[i]);  // the probe body, behind the tip
    g.strokeStyle = "#2457c5"; g.lineWidth = 6; g.lineCap = "round";
    g.beginPath(); g.moveTo(px(back), py(back)); g.lineTo(px(tip), py(tip)); g.stroke();
    g.lineWidth = 1;
    g.fillStyle = "#2457c5";
    g.beginPath(); g.arc(px(tip), py(tip), 5, 0, 2 * Math.PI); g.fill();
  }
  if (!points.length) {
    g.fillStyle = "#5b6475";
    g.fillText("patient surface: not registered yet", 16, canvas.height - 28);
  }
}

get("/api/settings").then(showSettings).catch((error) => showMessage(`settings: ${error.message}`, true));
connectEvents();
setInterval(tick, SEND_PERIOD_MS);
setInterval(render, 100);  // the banner also reacts to silence, not only to events
