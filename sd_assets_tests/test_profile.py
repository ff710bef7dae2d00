"""The GPU profile: what a style's metadata and gallery page say about how busy the GPU was."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from types import SimpleNamespace

import pytest

from sd_assets.domain import gallery
from sd_assets.domain.grid import load_grid
from sd_assets.domain.profile import GpuProfile, GpuProfiler, SampleSource, load_profile, profile_key, save_profile
from sd_assets.domain.prompts import GenerationSettings, build_prompt_rows
from sd_assets.domain.store import LocalStore
from sd_assets_tests.helpers import materialize_style, write_grid

READINGS = [(20.0, 1000.0), (40.0, 1500.0), (60.0, 3000.0), (100.0, 2500.0)]


def fake_source(readings=READINGS) -> tuple[SampleSource, threading.Event]:
    """Gives ``readings`` in order, then fails, which ends sampling after exactly that many samples."""
    readings = iter(readings)
    finished = threading.Event()

    def read():
        try:
            return next(readings)
        except StopIteration:
            finished.set()
            raise RuntimeError("fake GPU gone") from None

    return SampleSource("fake", read), finished


def profile_from_fake_gpu(readings=READINGS) -> GpuProfile:
    source, finished = fake_source(readings)
    with GpuProfiler("cuda:0", interval=0.001, source=source) as profiler:
        assert finished.wait(10)
    return profiler.profile()


def test_profile_of_known_samples_has_their_mean_peak_and_chart():
    profile = profile_from_fake_gpu()

    assert [s.utilisation for s in profile.samples] == [20.0, 40.0, 60.0, 100.0]
    assert profile.metadata() == {
        "gpu_profile": profile.summary,
        "gpu_util_mean": 55.0,
        "gpu_util_peak": 100.0,
        "gpu_memory_peak_mb": 3000.0,
    }
    assert "mean 55%, peak 100%" in profile.summary
    assert "peak memory used 3,000 MB" in profile.summary
    assert "fake GPU gone" in profile.summary
    points = re.search(r'<polyline [^>]*points="([^"]+)"', profile.chart_svg).group(1).split()
    heights = [float(point.split(",")[1]) for point in points]
    # 80 px tall, 0% at the bottom: 20, 40, 60 and 100% sit at 64, 48, 32 and 0.
    assert heights == [64.0, 48.0, 32.0, 0.0]
    xs = [float(point.split(",")[0]) for point in points]
    assert xs == sorted(xs) and 0 <= xs[0] and xs[-1] <= gallery.CHART_WIDTH
    assert profile.chart_markdown().startswith("![GPU utilisation over time](data:image/svg+xml;base64,")


def test_profile_without_utilisation_readings_says_so_and_keeps_the_memory_peak():
    # What torch.cuda gives when its NVML backend is missing: memory, but no utilisation.
    profile = profile_from_fake_gpu([(None, 1000.0)] * 3)

    assert "GPU utilisation not readable (install nvidia-ml-py);" in profile.summary
    assert "%" not in profile.summary and "peak memory used 1,000 MB" in profile.summary
    assert profile.metadata() == {"gpu_profile": profile.summary, "gpu_memory_peak_mb": 1000.0}
    assert profile.chart_svg == ""


def test_a_pass_shorter_than_one_interval_still_gets_one_reading():
    source = SampleSource("fake", lambda: (70.0, 1200.0))
    with GpuProfiler("cuda:0", interval=3600, source=source) as profiler:
        pass
    profile = profiler.profile()

    assert [(s.utilisation, s.memory_mb) for s in profile.samples] == [(70.0, 1200.0)]
    assert profile.metadata() == {
        "gpu_profile": profile.summary,
        "gpu_util_mean": 70.0,
        "gpu_util_peak": 70.0,
        "gpu_memory_peak_mb": 1200.0,
    }
    assert profile.summary.startswith("cuda:0, 1 sample from fake over ")
    assert "GPU utilisation mean 70%, peak 70%" in profile.summary
    # One reading is drawn as a level line across the chart, at 70% of its 80 px: 24 px from the top.
    points = re.search(r'<polyline [^>]*points="([^"]+)"', profile.chart_svg).group(1)
    assert points == f"0.0,24.0 {gallery.CHART_WIDTH:.1f},24.0"


@pytest.mark.parametrize(
    ("visible", "device", "measured"),
    [
        (None, "cuda", 10.0), (None, "cuda:1", 11.0),
        # CUDA numbers only the visible GPUs, in the order given; NVML numbers every GPU on the node.
        ("3,1", "cuda:0", 13.0), ("3,1", "cuda:1", 11.0), ("GPU-aaaa, GPU-bbbb", "cuda:1", 99.0),
    ],
)  # fmt: skip
def test_the_nvml_source_reads_the_gpu_the_run_computes_on(monkeypatch, visible, device, measured):
    import pynvml

    from sd_assets.domain.profile import MIB, open_sample_source

    by_index = {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0}
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: ("index", index))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", lambda uuid: ("uuid", uuid))

    def utilisation(handle):
        kind, which = handle
        return SimpleNamespace(gpu=by_index[which] if kind == "index" else {"GPU-bbbb": 99.0}[which])

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", utilisation)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(used=1536 * MIB))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    source = open_sample_source(device)
    assert source.name == "NVML" and source.read() == (measured, 1536.0)
    assert open_sample_source("cpu") is None


def test_a_mig_slice_without_utilisation_readings_is_sampled_for_its_memory(monkeypatch):
    """NVML reads a MIG slice's memory but not its utilisation (NVML_ERROR_NOT_SUPPORTED)."""
    import pynvml

    from sd_assets.domain.profile import MIB, GpuProfiler, open_sample_source

    def not_supported(handle):
        raise pynvml.NVMLError_NotSupported(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", lambda uuid: ("uuid", uuid))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", not_supported)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(used=2048 * MIB))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1a2b3c4d-0000-1111-2222-333344445555")

    source = open_sample_source("cuda")
    assert source.name == "NVML (memory only)" and source.read() == (None, 2048.0)
    profiler = GpuProfiler("cuda", interval=0.01, source=source).start()
    time.sleep(0.2)
    profile = profiler.stop()
    assert len(profile.samples) > 3 and profile.error is None and profile.memory_peak_mb == 2048.0
    assert "GPU utilisation not readable (NVML reads none for this device, a MIG slice);" in profile.summary

    # Another error of NVML's (no permission, a GPU lost) is not a MIG slice: torch.cuda is asked instead.
    def no_permission(handle):
        raise pynvml.NVMLError_NoPermission(pynvml.NVML_ERROR_NO_PERMISSION)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", no_permission)
    assert open_sample_source("cuda").name == "torch.cuda"


def test_profile_survives_the_store_round_trip():
    profile = profile_from_fake_gpu()
    again = GpuProfile.from_json(profile.to_json())
    assert again == profile
    assert again.page_view() == {
        "made_by": "An earlier run, which the record does not name.",
        "summary": profile.summary,
        "chart_svg": profile.chart_svg,
    }


def test_a_damaged_profile_file_reads_as_none_not_a_failed_gallery(tmp_path):
    store = LocalStore(tmp_path)
    profile = profile_from_fake_gpu()
    save_profile(store, "Banksy", profile, "0f3a9c41-run")
    saved = load_profile(store, "Banksy")
    assert dataclasses.replace(saved, run_id="", ended="") == profile
    assert re.fullmatch(r"Run 0f3a9c41, ended \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", saved.page_view()["made_by"])
    # One saved before profiles named their run reads, and says it names none (not read as the page's run).
    before_runs_were_named = profile.to_json().replace(', "run_id": "", "ended": ""', "")
    assert "run_id" not in before_runs_were_named
    store.write_text(profile_key("Banksy"), before_runs_were_named)
    assert load_profile(store, "Banksy") == profile
    assert load_profile(store, "Banksy").page_view()["made_by"] == "An earlier run, which the record does not name."
    for damaged in ['{"device": "cuda:0", "samples": ', '{"device": "cuda:0"}', "[1, 2]", "\udcff"]:
        store.write_bytes(profile_key("Banksy"), damaged.encode("utf-8", "surrogateescape"))
        assert load_profile(store, "Banksy") is None, damaged
    assert load_profile(store, "Basquiat") is None


def test_cpu_profile_says_no_gpu_was_measured_and_gives_no_numbers():
    with GpuProfiler("cpu", interval=0.001) as profiler:
        pass
    profile = profiler.profile()

    assert profile.summary.startswith("CPU: no GPU utilisation measured")
    assert "%" not in profile.summary and "MB" not in profile.summary
    assert profile.samples == ()
    assert profile.metadata() == {"gpu_profile": profile.summary}
    assert profile.chart_svg == ""


def test_style_page_shows_a_stored_gpu_profile_with_its_chart(tmp_path):
    grid = load_grid(write_grid(tmp_path))
    settings = GenerationSettings.from_grid(grid, "rev", "PNDMScheduler")
    rows = build_prompt_rows(grid, "Banksy", ["alan turing"], settings)
    store = LocalStore(tmp_path / "data")

    profile = profile_from_fake_gpu()
    gallery.render_style_pages(store, "Banksy", rows, [], profile=profile.page_view())

    page = store.read_text("gallery/banksy/page-1.html")
    assert "GPU utilisation mean 55%, peak 100%" in page
    assert "<polyline" in page and "<svg" in page


def test_cpu_run_records_its_profile_in_metadata_the_store_and_the_gallery(grid_path, instance):
    result = materialize_style(grid_path, "Banksy", instance)

    metadata = result.asset_materializations_for_node("style_images")[0].metadata
    assert metadata["gpu_profile"].value.startswith("CPU: no GPU utilisation measured")
    assert not {"gpu_util_mean", "gpu_util_peak", "gpu_memory_peak_mb", "gpu_util_chart"} & set(metadata)
    store = LocalStore(grid_path.parent / "data")
    assert GpuProfile.from_json(store.read_text(profile_key("Banksy"))).source is None
    page = store.read_text("gallery/banksy/page-1.html")
    assert f"<h2>Last generation</h2>\n  <p>Run {result.run_id[:8]}, ended " in page
    assert "CPU: no GPU utilisation measured" in page
    assert "<svg" not in page
