"""The GPU profile of one generation pass: how busy the GPU was and how much memory it held.

Owns sampling a device once a second on a daemon thread while a style generates (NVML through
``pynvml`` / ``nvidia-ml-py`` when installed, ``torch.cuda`` otherwise, nothing on a CPU),
summarising the samples (mean and peak utilisation, peak memory), drawing them as a small
utilisation-over-time chart, and the JSON form kept in the store at ``profiles/<slug>.json``.
On a CPU the profile says that no GPU was measured; it never invents numbers.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sd_assets.domain.devices import cuda_index
from sd_assets.domain.gallery import count, render_utilisation_chart
from sd_assets.domain.grid import slugify
from sd_assets.domain.store import ArtifactStore

MIB = 1024 * 1024
DEFAULT_INTERVAL_SECONDS = 1.0
NVML = "NVML"
NVML_WITHOUT_UTILISATION = "NVML (memory only)"  # a MIG slice


def profile_key(style: str) -> str:
    """Store key of a style's last GPU profile."""
    return f"profiles/{slugify(style)}.json"


def save_profile(store: ArtifactStore, style: str, profile: GpuProfile, run_id: str = "") -> None:
    """Keep ``profile`` as the style's last, made by ``run_id`` and ending now, for its gallery page."""
    ended = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    store.write_text(profile_key(style), dataclasses.replace(profile, run_id=run_id, ended=ended).to_json())


def load_profile(store: ArtifactStore, style: str) -> GpuProfile | None:
    """The style's last GPU profile, or None before its first generation or when the file is not one
    (it only adds a line to the style's page, which must not fail for it; the next generation rewrites it)."""
    key = profile_key(style)
    if not store.exists(key):
        return None
    try:
        return GpuProfile.from_json(store.read_text(key))
    except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


@dataclass(frozen=True)
class Sample:
    """One reading: seconds since sampling began, utilisation in percent (None: not readable), memory used in MB."""

    seconds: float
    utilisation: float | None
    memory_mb: float


@dataclass(frozen=True)
class SampleSource:
    """Where readings come from: ``read()`` returns (utilisation percent or None, memory used in MB)."""

    name: str
    read: Callable[[], tuple[float | None, float]]


def _nvml_source(device: str) -> SampleSource | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = cuda_index(device)
        # NVML numbers every GPU on the node; CUDA numbers only the visible ones, in the order given.
        visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
        if visible:
            entry = visible[index]
            if entry.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(entry)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except (pynvml.NVMLError, IndexError):
        return None
    try:
        pynvml.nvmlDeviceGetUtilizationRates(handle)
        utilisation_readable = True
    except pynvml.NVMLError_NotSupported:  # a MIG slice: NVML reads its memory, not its utilisation
        utilisation_readable = False
    except pynvml.NVMLError:  # no permission, a GPU lost: torch.cuda is asked instead
        return None

    def read() -> tuple[float | None, float]:
        utilisation = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) if utilisation_readable else None
        return utilisation, pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB

    return SampleSource(NVML if utilisation_readable else NVML_WITHOUT_UTILISATION, read)


def _torch_cuda_source(device: str) -> SampleSource:
    import torch

    try:
        torch.cuda.utilization(device)
        utilisation_readable = True
    except Exception:  # torch raises whatever its NVML/AMD SMI backend raises, ImportError included
        utilisation_readable = False

    def read() -> tuple[float | None, float]:
        free, total = torch.cuda.mem_get_info(device)
        utilisation = float(torch.cuda.utilization(device)) if utilisation_readable else None
        return utilisation, (total - free) / MIB

    return SampleSource("torch.cuda", read)


def open_sample_source(device: str) -> SampleSource | None:
    """NVML for a CUDA device when available, else ``torch.cuda``; None for a CPU."""
    if not device.startswith("cuda"):
        return None
    return _nvml_source(device) or _torch_cuda_source(device)


@dataclass(frozen=True)
class GpuProfile:
    """Samples taken while a style generated, and what they add up to."""

    device: str
    source: str | None
    interval_seconds: float
    seconds: float
    samples: tuple[Sample, ...] = ()
    error: str | None = None
    # The run that generated, and when it ended: set when saved (a later run with nothing to make
    # keeps the profile, so a style's page must say whose it is).
    run_id: str = ""
    ended: str = ""

    @property
    def utilisations(self) -> list[float]:
        return [s.utilisation for s in self.samples if s.utilisation is not None]

    @property
    def util_mean(self) -> float | None:
        values = self.utilisations
        return sum(values) / len(values) if values else None

    @property
    def util_peak(self) -> float | None:
        return max(self.utilisations, default=None)

    @property
    def memory_peak_mb(self) -> float | None:
        return max((s.memory_mb for s in self.samples), default=None)

    @property
    def summary(self) -> str:
        if self.source is None:
            return f"{self.device.upper()}: no GPU utilisation measured ({self.seconds:.1f} s of generation)."
        parts = [f"{self.device}, {count(len(self.samples), 'sample')} from {self.source} over {self.seconds:.1f} s:"]
        if self.util_mean is not None:
            parts.append(f"GPU utilisation mean {self.util_mean:.0f}%, peak {self.util_peak:.0f}%;")
        elif self.source == NVML_WITHOUT_UTILISATION:
            parts.append("GPU utilisation not readable (NVML reads none for this device, a MIG slice);")
        else:
            parts.append("GPU utilisation not readable (install nvidia-ml-py);")
        if self.memory_peak_mb is not None:
            parts.append(f"peak memory used {self.memory_peak_mb:,.0f} MB.")
        else:
            parts.append("no memory readings.")
        if self.error:
            parts.append(f"Sampling stopped early: {self.error}")
        return " ".join(parts)

    @property
    def chart_svg(self) -> str:
        """Utilisation over time as an inline SVG; empty when there is no utilisation to draw."""
        points = [(s.seconds, s.utilisation) for s in self.samples if s.utilisation is not None]
        if not points:
            return ""
        return render_utilisation_chart(points, max(self.seconds, points[-1][0]))

    def chart_markdown(self) -> str:
        """The chart as a Markdown image (a data URI), for materialization metadata."""
        encoded = base64.b64encode(self.chart_svg.encode()).decode()
        return f"![GPU utilisation over time](data:image/svg+xml;base64,{encoded})"

    def metadata(self) -> dict[str, float | str]:
        """Plain values for materialization metadata: the numbers only where they were measured."""
        values: dict[str, float | str] = {"gpu_profile": self.summary}
        if self.util_mean is not None:
            values["gpu_util_mean"] = round(self.util_mean, 1)
            values["gpu_util_peak"] = round(self.util_peak, 1)
        if self.memory_peak_mb is not None:
            values["gpu_memory_peak_mb"] = round(self.memory_peak_mb, 1)
        return values

    def page_view(self) -> dict[str, str]:
        """What a gallery page shows: which run, the summary line and the chart."""
        # One saved before profiles named their run says so: under a page "as of" a later run, a
        # bare summary read as that run's.
        made_by = "An earlier run, which the record does not name."
        if self.run_id:
            made_by = f"Run {self.run_id[:8]}, ended {self.ended}."
        return {"made_by": made_by, "summary": self.summary, "chart_svg": self.chart_svg}

    def to_json(self) -> str:
        return json.dumps(
            {
                "device": self.device,
                "source": self.source,
                "interval_seconds": self.interval_seconds,
                "seconds": self.seconds,
                "samples": [[s.seconds, s.utilisation, s.memory_mb] for s in self.samples],
                "error": self.error,
                "run_id": self.run_id,
                "ended": self.ended,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> GpuProfile:
        data = json.loads(text)
        return cls(
            device=str(data["device"]),
            source=None if data["source"] is None else str(data["source"]),
            interval_seconds=float(data["interval_seconds"]),
            seconds=float(data["seconds"]),
            samples=tuple(
                Sample(float(t), None if u is None else float(u), float(m)) for t, u, m in data["samples"]
            ),
            error=None if data["error"] is None else str(data["error"]),
            # Profiles saved before these were kept name no run.
            run_id=str(data.get("run_id", "")),
            ended=str(data.get("ended", "")),
        )


class GpuProfiler:
    """Samples ``device`` every ``interval`` seconds on a daemon thread between ``start`` and ``stop``.

    ``source`` defaults to ``open_sample_source(device)`` (None on a CPU: nothing is sampled);
    pass one to sample something else. A reading that fails ends sampling; the profile keeps the
    samples taken so far and says why.
    """

    def __init__(self, device: str, interval: float = DEFAULT_INTERVAL_SECONDS, source: SampleSource | None = None):
        self.device = device
        self.interval = interval
        self.source = source if source is not None else open_sample_source(device)
        self._samples: list[Sample] = []
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._seconds = 0.0

    def _read(self) -> bool:
        try:
            utilisation, memory_mb = self.source.read()
        except Exception as exc:  # a GPU can vanish mid-run; generation must not fail because of it
            self._error = f"{type(exc).__name__}: {exc}"
            return False
        self._samples.append(Sample(time.monotonic() - self._started, utilisation, memory_mb))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._read():
                return

    def start(self) -> GpuProfiler:
        self._started = time.monotonic()
        if self.source is not None:
            self._thread = threading.Thread(target=self._run, name="sd-assets-gpu-profile", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> GpuProfile:
        self._seconds = time.monotonic() - self._started
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            # A pass shorter than one interval still gets one reading.
            if not self._samples and self._error is None:
                self._read()
        return self.profile()

    def profile(self) -> GpuProfile:
        return GpuProfile(
            device=self.device,
            source=None if self.source is None else self.source.name,
            interval_seconds=self.interval,
            seconds=self._seconds,
            samples=tuple(self._samples),
            error=self._error,
        )

    def __enter__(self) -> GpuProfiler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
