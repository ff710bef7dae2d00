"""Making a style's missing images: render, encode, store, record, report progress.

Owns the loop a worker runs for one style partition: batches go through the engine, each image
is encoded as a PNG with its provenance and written to the store on the background pool, and
catalog records are flushed every few dozen images so a crash loses no provenance (what was not
flushed is recovered from the PNGs themselves).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sd_assets.domain import catalog
from sd_assets.domain.engine import BoundedWriter, LoadedPipeline, cpu_threads, generate, software_versions
from sd_assets.domain.models import ModelRef
from sd_assets.domain.pngmeta import Provenance, encode_png, image_key_path
from sd_assets.domain.prompts import GenerationSettings, PromptRow
from sd_assets.domain.store import ArtifactStore

PROGRESS_EVERY_SECONDS = 5.0
RECORD_FLUSH_EVERY = 64
PREVIEW_COUNT = 4


@dataclass
class StyleRunReport:
    """What one pass over a style's missing images did."""

    generated: int
    seconds: float
    first_batch_seconds: float
    compile_seconds: float
    writer_peak_pending: int
    previews: list = field(default_factory=list)
    # Images rendered only to fill a short last batch to a shape already compiled.
    padded_images: int = 0
    # Images the model's safety checker flagged and blacked out.
    safety_flagged: int = 0
    # The batch size the last batch ran at: smaller than asked when the GPU ran out of memory.
    batch_size: int = 0
    # The images of the first batch that ran out of memory (0: none did).
    out_of_memory_rows: int = 0

    @property
    def images_per_minute(self) -> float:
        return 60 * self.generated / self.seconds if self.seconds > 0 else 0.0


def make_style_images(
    store: ArtifactStore,
    loaded: LoadedPipeline,
    ref: ModelRef,
    settings: GenerationSettings,
    rows: Sequence[PromptRow],
    *,
    style: str,
    partition: str,
    run_id: str,
    batch_size: int,
    writer_threads: int = 4,
    max_pending: int = 64,
    log: Callable[[str], None] = lambda message: None,
    attempt: int = 0,
) -> StyleRunReport:
    """Render ``rows``, write each PNG under its content key, and leave catalog records behind.

    ``log`` receives a progress line (done/total, images/s, time left) every few seconds, and a
    line when the GPU runs out of memory and the batches are halved. ``attempt`` is the step's
    try within its run (after a store outage): each try's pending files are named apart, so a
    try does not overwrite the batches and the intent of the one before.
    """
    files = f"{run_id}-try{attempt + 1}" if attempt else run_id
    catalog.write_intent(store, style, files, [row.key for row in rows])
    # A run of the style killed while writing some of these left half-written files beside them:
    # this run, holding the style, makes them whole.
    store.discard_partial_writes([image_key_path(row.key) for row in rows])
    deep_cache = settings.deep_cache.describe() if settings.deep_cache else ""
    software = software_versions()
    threads = cpu_threads(loaded.device)
    # Only the records not flushed yet: a run of 100,000 images held every one, 1.2 KB each.
    records: list[dict] = []
    previews: list = []
    # The first rows in grid order (not the first written): the same subjects in every style.
    preview_order = {row.key: index for index, row in enumerate(rows[:PREVIEW_COUNT])}
    lock = threading.Lock()
    flushed = 0
    flagged = 0

    def write_image(row: PromptRow, pixels, safety_flagged: bool) -> None:
        from PIL import Image

        nonlocal flagged
        image = Image.fromarray(pixels)
        provenance = Provenance(
            key=row.key, subject=row.subject, style=style, image_index=row.image_index, prompt=row.prompt,
            negative_prompt=row.negative_prompt, seed=row.seed, model_id=ref.model_id,
            model_revision=ref.revision, scheduler=loaded.scheduler, steps=settings.steps,
            guidance_scale=settings.guidance_scale, width=settings.width, height=settings.height,
            run_id=run_id, partition=partition,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=loaded.device,
            dtype=loaded.dtype, deep_cache=deep_cache, model_variant=ref.variant or "", software=software,
            safety_flagged=safety_flagged, safety_checker=settings.safety_checker, cpu_threads=threads,
        )  # fmt: skip
        key = image_key_path(row.key)
        store.write_bytes(key, encode_png(image, provenance))
        with lock:
            records.append(catalog.catalog_record(provenance, store.location(key)))
            flagged += safety_flagged
            if row.key in preview_order:
                previews.append((row, image))

    def flush(force: bool = False) -> None:
        nonlocal flushed
        with lock:
            batch = records[:] if force or len(records) >= RECORD_FLUSH_EVERY else []
            del records[: len(batch)]
            flushed += len(batch)
        if batch:
            catalog.write_pending(store, style, f"{files}-{flushed:06d}", batch)

    last_report = 0.0

    def progress(done: int, total: int, elapsed: float) -> None:
        nonlocal last_report
        flush()
        if elapsed - last_report >= PROGRESS_EVERY_SECONDS or done == total:
            last_report = elapsed
            rate = done / elapsed if elapsed > 0 else 0.0
            left = (total - done) / rate if rate > 0 else 0.0
            log(f"{style}: {done}/{total} images, {rate:.2f} images/s, about {left:.0f} s left")

    writer = BoundedWriter(writer_threads, max_pending)
    start = time.perf_counter()
    try:
        try:
            stats = generate(
                loaded, rows, settings, batch_size, write_image, writer, progress,
                on_smaller_batches=lambda old, new: log(
                    f"{style}: out of memory on {loaded.device} at batch size {old}; going on at {new}"
                ),
            )  # fmt: skip
        except BaseException as failed:
            # The error generation stopped at is the one to act on (what to make smaller, say): a
            # write that failed meanwhile is said, not raised over it.
            try:
                writer.close()
            except Exception as write_failed:
                if write_failed is not failed:  # generation stops at a failed write with its very error
                    log(f"{style}: a PNG could not be written either: {write_failed}")
            raise
        writer.close()  # raises a failed write's error
    finally:  # the records of the images that were written, whatever failed
        flush(force=True)
    return StyleRunReport(
        generated=stats.generated,
        seconds=time.perf_counter() - start,
        first_batch_seconds=stats.first_batch_seconds or 0.0,
        compile_seconds=stats.compile_seconds,
        padded_images=stats.padded,
        batch_size=stats.batch_size,
        out_of_memory_rows=stats.out_of_memory_rows,
        writer_peak_pending=writer.peak_pending,
        safety_flagged=flagged,
        previews=sorted(previews, key=lambda preview: preview_order[preview[0].key]),
    )
