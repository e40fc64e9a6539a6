"""Flow curve and ICS uroflowmetry parameters from the weight samples of one void.

Gravimetric uroflowmeters weigh the voided urine: volume = weight / density, flow = d(volume)/dt.
The pipeline, each step for a reason:

1. resample onto a uniform grid at the scale's rate (a dropped sample must not fake a flow step);
2. a running median over ``median_window_s`` (1 s) removes knocks and spikes on the load cell,
   which are short and large, while leaving the monotone volume ramp untouched;
3. flow = gradient of volume, then a centred sliding average over ``smoothing_s`` (2 s): the ICS
   asks for Qmax read from a smoothed curve, ignoring changes shorter than 2 s;
4. flow is "present" above ``flow_threshold`` (1 mL/s) — inference, the ICS gives no number.

ICS definitions (Abrams et al., ICS standardisation of terminology, 2002): voiding time = whole
duration of micturition including interruptions; flow time = time with measurable flow; time to
Qmax from the onset of flow; Qave = voided volume / flow time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


class VoidRejected(ValueError):
    """The weight trace is not a plausible void (too small, implausible flow, too short)."""


@dataclass(frozen=True)
class FlowSettings:
    density_g_per_ml: float = 1.0
    """Urine density; 1.0 g/mL is what gravimetric flowmeters assume (SG 1.005-1.030 → ≤3 %)."""
    median_window_s: float = 1.0
    smoothing_s: float = 2.0
    flow_threshold_ml_s: float = 1.0
    min_volume_ml: float = 20.0
    max_plausible_flow_ml_s: float = 60.0
    """Above any physiological Qmax: an object put on the scale, not urine."""
    knock_grams: float = 30.0
    """A raw sample this far from the despiked trace counts as a knock (reported, not used)."""


@dataclass(frozen=True)
class VoidAnalysis:
    voided_volume_ml: float
    qmax_ml_s: float
    qave_ml_s: float
    voiding_time_s: float
    flow_time_s: float
    time_to_qmax_s: float
    flow_start_s: float
    """Onset of flow, in the time base of the input samples."""
    curve_start_s: float
    period_s: float
    curve_ml_s: tuple[float, ...]
    """Smoothed flow from ``curve_start_s`` every ``period_s`` (about 1 s before onset to 1 s
    after the end of flow)."""
    knocks: int


def running_median(values: FloatArray, width: int) -> FloatArray:
    """Centred running median of odd ``width``; the ends use the nearest full window."""
    if width <= 1 or len(values) < width:
        return values.copy()
    half = width // 2
    padded = np.pad(values, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)
    return np.median(windows, axis=1)


def sliding_average(values: FloatArray, width: int) -> FloatArray:
    if width <= 1:
        return values.copy()
    kernel = np.ones(width) / width
    padded = np.pad(values, width // 2, mode="edge")
    return np.convolve(padded, kernel, mode="valid")[: len(values)]


def analyse_void(
    times_s: FloatArray, grams: FloatArray, rate_hz: float, settings: FlowSettings | None = None
) -> VoidAnalysis:
    """Analyse one void; the trace must start and end with ≥ 1 s of still weight."""
    settings = settings or FlowSettings()
    if len(times_s) != len(grams) or len(times_s) < 4:
        raise VoidRejected(f"need matching time/weight arrays of >= 4 samples, got {len(times_s)}")
    if np.any(np.diff(times_s) <= 0):
        raise VoidRejected("sample times are not strictly increasing")
    period = 1.0 / rate_hz
    grid = np.arange(times_s[0], times_s[-1] + period / 2, period)
    weight = np.interp(grid, times_s, grams)
    despiked = running_median(weight, odd_window(settings.median_window_s * rate_hz))
    knocks = _count_runs(np.abs(weight - despiked) > settings.knock_grams)
    volume = despiked / settings.density_g_per_ml
    flow = sliding_average(np.gradient(volume, period), odd_window(settings.smoothing_s * rate_hz))
    flowing = np.flatnonzero(flow > settings.flow_threshold_ml_s)
    if len(flowing) == 0:
        raise VoidRejected("no flow above the threshold")
    first, last = int(flowing[0]), int(flowing[-1])
    still = max(1, round(rate_hz))
    voided = float(np.median(volume[-still:]) - np.median(volume[:still]))
    if voided < settings.min_volume_ml:
        raise VoidRejected(f"voided volume {voided:.0f} mL < {settings.min_volume_ml:.0f} mL")
    peak = first + int(np.argmax(flow[first : last + 1]))
    qmax = float(flow[peak])
    if qmax > settings.max_plausible_flow_ml_s:
        raise VoidRejected(f"Qmax {qmax:.0f} mL/s is not physiological (object on the scale?)")
    flow_time = len(flowing) * period
    curve_from, curve_to = max(0, first - still), min(len(flow), last + still + 1)
    return VoidAnalysis(
        voided_volume_ml=voided,
        qmax_ml_s=qmax,
        qave_ml_s=voided / flow_time,
        voiding_time_s=(last - first + 1) * period,
        flow_time_s=flow_time,
        time_to_qmax_s=(peak - first) * period,
        flow_start_s=float(grid[first]),
        curve_start_s=float(grid[curve_from]),
        period_s=period,
        curve_ml_s=tuple(round(float(v), 2) for v in np.clip(flow[curve_from:curve_to], 0, None)),
        knocks=knocks,
    )


def odd_window(samples: float) -> int:
    """A centred window needs an odd sample count (at least 1)."""
    count = max(1, round(samples))
    return count if count % 2 else count + 1


def _count_runs(mask: NDArray[np.bool_]) -> int:
    """Number of separate runs of True."""
    if not mask.any():
        return 0
    return int(mask[0]) + int(np.count_nonzero(mask[1:] & ~mask[:-1]))
