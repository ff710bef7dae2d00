"""How long the new_subject_lists sensor takes on a folder of 10,000 subject lists.

Evaluates the real sensor (through ``build_sensor_context`` and a real instance) three times: a
first look that reads every list, a look with nothing changed, and a look after one list
changed. Prints times, lists read, the cursor's size, and the ratios, all from this one run.

    python benchmarks/bench_sensor.py [--lists 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_assets.definitions import build_definitions  # noqa: E402
from sd_assets.domain.subject_lists import FolderSource, decode_cursor, scan_subject_lists  # noqa: E402
from sd_assets.orchestration.sensors import NEW_SUBJECT_LISTS  # noqa: E402
from sd_assets_tests.helpers import write_grid  # noqa: E402

SETTLED_NS = time.time_ns() - 3600 * 10**9
SENSOR_TIME_LIMIT_SECONDS = 60  # Dagster's default sensor evaluation timeout


def make_lists(folder: Path, count: int) -> None:
    for i in range(count):
        path = folder / f"list-{i:05d}.txt"
        path.write_text("".join(f"subject {i}-{j}\n" for j in range(20)))
        os.utime(path, ns=(SETTLED_NS, SETTLED_NS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        grid = write_grid(Path(tmp), styles=("Banksy", "Andy Warhol"))
        subjects = Path(tmp) / "subjects"
        (subjects / "people.txt").unlink()
        make_lists(subjects, args.lists)
        defs = build_definitions({"SD_ASSETS_GRID": str(grid)})
        sensor = defs.resolve_sensor_def(NEW_SUBJECT_LISTS)
        cursor = None

        def evaluate() -> tuple[float, dg.SensorResult]:
            nonlocal cursor
            with dg.build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
            ) as context:
                start = time.perf_counter()
                result = sensor(context)
                seconds = time.perf_counter() - start
            cursor = result.cursor if result.cursor is not None else cursor
            return seconds, result

        first_seconds, first = evaluate()
        unchanged_seconds, unchanged = evaluate()
        changed = subjects / "list-00042.txt"
        changed.write_text("a new subject\n")
        os.utime(changed, ns=(SETTLED_NS + 1, SETTLED_NS + 1))
        one_changed_seconds, one_changed = evaluate()

        state = decode_cursor(cursor).state
        table = {name: [s.size, s.mtime_ns, s.sha, int(s.valid)] for name, s in state.items()}
        raw_json_bytes = len(json.dumps(table, separators=(",", ":")))
        scan = scan_subject_lists(FolderSource(subjects), state, 10_000)

    print(f"lists: {args.lists}")
    print(f"first look (reads every list):  {first_seconds:7.3f} s, {len(first.run_requests)} run requests")
    print(
        f"nothing changed:                {unchanged_seconds:7.3f} s, {len(unchanged.run_requests or [])} run requests"
    )
    print(f"one list changed:               {one_changed_seconds:7.3f} s, {len(one_changed.run_requests)} run requests")
    print(f"lists a further unchanged look reads: {scan.read}")
    print(f"cursor: {len(cursor):,} characters (about {raw_json_bytes:,} as plain JSON)")
    print(f"ratio first / unchanged: {first_seconds / unchanged_seconds:.1f}x")
    print(f"unchanged look uses {100 * unchanged_seconds / SENSOR_TIME_LIMIT_SECONDS:.2f}% of the 60 s sensor limit")


if __name__ == "__main__":
    main()
