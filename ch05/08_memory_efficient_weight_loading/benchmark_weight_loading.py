"""Peak memory and time of each weight-loading method, each in a fresh process.

    python benchmark_weight_loading.py                       # GPT-2 XL shape (1.6B parameters, 6.3 GiB)
    python benchmark_weight_loading.py --model gpt2-large    # 0.8B, if memory is tight
    python benchmark_weight_loading.py --model tiny --device cpu

The first run writes random weights of the chosen shape to --weights-dir (as .pth and
.safetensors; later runs reuse them after checking they fit the shape). Then every
method runs in its own Python process, because a process's peak RSS only ever goes up:
measured in one process, the first method's peak would hide the others'. Each process
loads the model, runs one forward pass (which touches every weight) and reports its
peak RSS (the kernel's high-water mark for the whole process, Python and PyTorch
included; see `run_worker`), the time taken and, on CUDA, the GPU peak. The table
divides the peak RSS by the size of the weights file.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from ch05_utils import RunLock, publish_atomic
from memory_efficient_loading import (
    METHODS,
    MODEL_CONFIGS,
    check_weights_file,
    file_size,
    measure_load,
    save_random_weights,
    weight_paths,
    weights_file_for,
)

GiB = 1024**3
LOCK_NAME = ".benchmark_weight_loading.lock"


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


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies (even by kill -9)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_in_subprocess(method: str, weights_dir: Path, model_name: str, device: str) -> dict:
    """Run `run_worker` in a fresh interpreter and parse the JSON line it prints.

    The worker is killed if this process is interrupted, and (on Linux) dies with it.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
           "--weights-dir", str(Path(weights_dir).resolve()), "--model", model_name, "--device", device]
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent, preexec_fn=preexec)
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
        raise RuntimeError(f"method {method} failed: {last}")
    return json.loads(out.strip().splitlines()[-1])


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


#####################################
# Checks before the long work
#####################################

def check_weights_files(weights_dir: Path, model_name: str) -> None:
    """Make sure weight files kept from an earlier run are complete and of the chosen shape.

    The files are reused between runs; one that is truncated, foreign or of another
    model shape would otherwise fail inside a worker, or be measured as something it is not.
    """
    for path in weight_paths(weights_dir, model_name):
        if not path.exists():
            continue  # written in a moment
        try:
            check_weights_file(path, MODEL_CONFIGS[model_name])
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{err} Delete it (the benchmark writes it again) or pick another --weights-dir.") \
                from None


def check_output_paths(weights_dir: Path, json_path: Path | None) -> None:
    """Fail now, not after minutes of work, on output paths that cannot be written."""
    if weights_dir.exists() and not weights_dir.is_dir():
        raise ValueError(f"--weights-dir {weights_dir} is a file, not a folder. Pick a folder.")
    weights_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(weights_dir, os.W_OK):
        raise ValueError(f"--weights-dir {weights_dir} is not writable. Pick a folder you can write to.")
    if json_path is not None:
        if json_path.is_dir():
            raise ValueError(f"--json {json_path} is a folder; give a file name.")
        if not json_path.parent.is_dir() or not os.access(json_path.parent, os.W_OK):
            raise ValueError(f"--json {json_path}: its folder does not exist or is not writable.")


#####################################
# Command line
#####################################

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


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def benchmark(args: argparse.Namespace) -> list[dict]:
    """Write or check the weights, then measure each method in its own process."""
    from tqdm import tqdm

    cfg = MODEL_CONFIGS[args.model]
    print(f"Model {args.model}: {cfg}")
    check_weights_files(args.weights_dir, args.model)
    pth_path, st_path = save_random_weights(cfg, args.weights_dir, args.model)
    print(f"Weights: {pth_path} ({file_size(pth_path) / GiB:.2f} GiB), {st_path} ({file_size(st_path) / GiB:.2f} GiB)")
    return [run_in_subprocess(method, args.weights_dir, args.model, args.device)
            for method in tqdm(args.methods, desc="methods", disable=None)]  # no bar off a terminal


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for, but PyTorch sees no CUDA GPU here. Use --device cpu.",
              file=sys.stderr)
        return 2
    if args.worker:
        try:
            print(json.dumps(run_worker(args.worker, args.weights_dir, args.model, args.device)))
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0

    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        check_output_paths(args.weights_dir, args.json)
        with RunLock(args.weights_dir, LOCK_NAME):  # a second benchmark on this folder is refused
            rows = benchmark(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted: no measurement written (finished weight files are kept for the next run).",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_table(rows))
    if args.json:
        result = json.dumps({"model": args.model, "device": args.device, "rows": rows}, indent=1)
        publish_atomic(args.json, lambda tmp: tmp.write_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
