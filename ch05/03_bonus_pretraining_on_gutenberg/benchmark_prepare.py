"""Throughput of prepare_dataset.py: single-threaded versus N threads versus N processes.

    python benchmark_prepare.py --data-dir $CH05_DATA_DIR/gutenberg/raw --workers 2

Runs the whole preparation (decode, strip, language check, tokenize, write) on the same
books with one worker, N threads and N processes, --repeats times each, alternating, and
prints the input megabytes per second of each (best of the repeats, the figure least
disturbed by other programs) and their ratio. Both runs must produce the same metadata.
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

from prepare_dataset import list_books, prepare


def time_prepare(data_dir: Path, workers: int, parallel: str) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped books' warnings
        start = time.perf_counter()
        metadata = prepare(data_dir, Path(out), workers=workers, parallel=parallel, progress=False)
        return time.perf_counter() - start, metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("gutenberg/data/raw"), help="Folder of raw books.")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes of the parallel run.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir() or not list_books(args.data_dir, seed=0):
        parser.error(f"--data-dir {args.data_dir} holds no .txt books.")
    if args.workers < 2 or args.repeats < 1:
        parser.error("--workers must be >= 2 and --repeats >= 1.")

    megabytes = sum(p.stat().st_size for p in list_books(args.data_dir, seed=0)) / 1e6
    runs = {"1 worker": (1, "thread"), f"{args.workers} threads": (args.workers, "thread"),
            f"{args.workers} processes": (args.workers, "process")}
    best = dict.fromkeys(runs, float("inf"))
    results = {}
    for _ in range(args.repeats):
        for name, (workers, parallel) in runs.items():
            seconds, results[name] = time_prepare(args.data_dir, workers, parallel)
            best[name] = min(best[name], seconds)
    if any(metadata != results["1 worker"] for metadata in results.values()):
        print("error: the runs wrote different metadata", file=sys.stderr)
        return 1
    print(f"{megabytes:.1f} MB of raw books, best of {args.repeats} run(s) each")
    for name, seconds in best.items():
        print(f"  {name:<12} {seconds:6.2f} s  {megabytes / seconds:6.2f} MB/s  "
              f"speed-up {best['1 worker'] / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
