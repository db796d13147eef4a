"""Peak memory and time of each weight-loading method, each in a fresh process.

    python benchmark_weight_loading.py                       # GPT-2 XL shape (1.6B parameters, 6.5 GB)
    python benchmark_weight_loading.py --model gpt2-large    # 0.8B, if memory is tight
    python benchmark_weight_loading.py --model tiny --device cpu

The first run writes random weights of the chosen shape to --weights-dir (as .pth and
.safetensors). Then every method runs in its own Python process, because a process's
peak RSS only ever goes up: measured in one process, the first method's peak would
hide the others'. Each process loads the model, runs one forward pass (which touches
every weight) and reports its peak RSS (the kernel's high-water mark for the whole
process, Python and PyTorch included; see `run_worker`), the time taken and, on CUDA, the GPU peak.
The table divides the peak RSS by the size of the weights file.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from memory_efficient_loading import (
    METHODS,
    MODEL_CONFIGS,
    file_size,
    measure_load,
    save_random_weights,
    weights_file_for,
)

GiB = 1024**3


def run_worker(method: str, weights_dir: Path, model_name: str, device: str) -> dict:
    """Load once with `method` in this process and return the measurements.

    The peak is `PeakMemory`'s (the kernel's high-water mark of this process, reset just
    before loading), not `getrusage`'s `ru_maxrss`: on Linux a process started with
    fork/vfork + exec inherits its parent's peak in `ru_maxrss`, which would report the
    parent's memory instead of the method's.
    """
    _, memory = measure_load(method, weights_dir, model_name, device)
    return {
        "method": method,
        "seconds": memory.seconds,
        "rss_before": memory.rss_before,
        "peak_rss": memory.peak_rss,
        "gpu_peak": memory.gpu_peak,
        "file_bytes": file_size(weights_file_for(method, weights_dir, model_name)),
    }


def run_in_subprocess(method: str, weights_dir: Path, model_name: str, device: str) -> dict:
    """Run `run_worker` in a fresh interpreter and parse the JSON line it prints."""
    cmd = [sys.executable, __file__, "--worker", method, "--weights-dir", str(weights_dir),
           "--model", model_name, "--device", device]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the measurements (the README's tables are printed by this)."""
    gpu = any(r["gpu_peak"] is not None for r in rows)
    header = "| method | load time (s) | peak RSS (GiB) | peak RSS / file size | RSS before (GiB) |"
    line = "| --- | ---: | ---: | ---: | ---: |"
    if gpu:
        header += " GPU peak (GiB) | GPU peak / file size |"
        line += " ---: | ---: |"
    out = [header, line]
    for r in rows:
        cells = [r["method"], f"{r['seconds']:.1f}", f"{r['peak_rss'] / GiB:.2f}",
                 f"{r['peak_rss'] / r['file_bytes']:.2f}", f"{r['rss_before'] / GiB:.2f}"]
        if gpu:
            cells += [f"{r['gpu_peak'] / GiB:.2f}", f"{r['gpu_peak'] / r['file_bytes']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_CONFIGS), default="gpt2-xl", help="Model shape.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="Where the model is loaded to.")
    parser.add_argument("--weights-dir", type=Path, default=Path("weights"),
                        help="Folder for the random weights (written on the first run).")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS),
                        help="Methods to measure, in this order.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the measurements to this file.")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)  # used by the subprocesses
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for, but PyTorch sees no CUDA GPU here. Use --device cpu.",
              file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.weights_dir, args.model, args.device)))
        return 0

    cfg = MODEL_CONFIGS[args.model]
    print(f"Model {args.model}: {cfg}")
    pth_path, st_path = save_random_weights(cfg, args.weights_dir, args.model)
    print(f"Weights: {pth_path} ({file_size(pth_path) / GiB:.2f} GiB), {st_path} ({file_size(st_path) / GiB:.2f} GiB)")
    rows = []
    try:
        from tqdm.auto import tqdm

        for method in tqdm(args.methods, desc="methods"):
            rows.append(run_in_subprocess(method, args.weights_dir, args.model, args.device))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": args.device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
