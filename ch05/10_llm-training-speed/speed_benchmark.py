"""Measure tokens/s and peak memory of `00_orig.py` and of `01_opt_single_gpu.py` as the
optimizations are switched on one after another, in one invocation, and print a table.

    python speed_benchmark.py --device cpu --batch-size 1 --steps 3        # the README's CPU table
    python speed_benchmark.py --device cuda --batch-size 16 --steps 10     # the README's GPU table

Every configuration runs in its own process (so peak memory and torch.compile caches
do not leak from one row into the next) for --warmup-steps untimed plus --steps timed
optimizer steps, and reports through --metrics-json. Before the first row and after
every row, the benchmark times plain square matrix products in each precision the rows
use: the practical peak of this device. Each row's model FLOP/s is compared with the
mean of the measurements just before and just after it, since a shared machine's speed
drifts over the minutes a benchmark takes (useful where the peak FLOP/s table has no
entry, like a CPU). Rows that need CUDA are skipped elsewhere.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from ch05_utils import get_device
from speed_settings import MODEL_PRESETS
from speed_utils import device_name, measure_matmul_flops, write_json_atomic

HERE = Path(__file__).resolve().parent

# (row label, script, flags added by this row, needs CUDA). Each row keeps the flags of the rows above it.
CONFIGS = [
    ("00_orig.py: the chapter's code", "00_orig.py", [], False),
    ("01, no flag (same computation)", "01_opt_single_gpu.py", [], False),
    ("+ causal mask built on the fly", "01_opt_single_gpu.py", ["--mask-on-the-fly"], False),
    ("+ TF32 tensor cores", "01_opt_single_gpu.py", ["--tf32"], True),
    ("+ fused AdamW", "01_opt_single_gpu.py", ["--fused-adamw"], False),
    ("+ pinned memory, non-blocking copies", "01_opt_single_gpu.py", ["--pin-memory"], True),
    ("+ bf16 autocast (fp32 master weights)", "01_opt_single_gpu.py", ["--bf16"], True),
    ("+ native LayerNorm and GELU", "01_opt_single_gpu.py", ["--native-ops"], False),
    ("+ scaled_dot_product_attention", "01_opt_single_gpu.py", ["--sdpa"], False),
    ("+ vocabulary padded to 50,304", "01_opt_single_gpu.py", ["--pad-vocab"], False),
    ("+ no weight decay on biases/norms", "01_opt_single_gpu.py", ["--no-decay-bias-norm"], False),
    ("+ gradient buffers kept between steps", "01_opt_single_gpu.py", ["--keep-grad-buffers"], False),
    ("+ torch.compile", "01_opt_single_gpu.py", ["--compile"], False),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="124M")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1, help="Windows per micro-batch, the same in every row.")
    parser.add_argument("--drop-rate", type=float, default=0.1,
                        help="Dropout rate of every row (the chapter's 0.1; large-data pretraining often uses 0).")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps per row.")
    parser.add_argument("--warmup-steps", type=int, default=2, help="Untimed steps per row (compilation, warm-up).")
    parser.add_argument("--grad-accum-steps", type=int, default=2,
                        help="Micro-batches per step in the last row (a larger batch with gradient accumulation).")
    parser.add_argument("--text-file", type=Path, default=None, help="Training text (default: Tiny Shakespeare).")
    parser.add_argument("--no-compile", action="store_true",
                        help="Leave out the torch.compile row (compiling takes many minutes on a small CPU).")
    parser.add_argument("--only", type=int, default=None,
                        help="Run only the first N applicable rows (for a quick look).")
    parser.add_argument("--output-json", type=Path, default=None, help="Also write all results to this file.")
    return parser


def rows_for(device: torch.device, grad_accum_steps: int,
             compile_model: bool = True) -> list[tuple[str, str, list[str]]]:
    """The applicable rows with their cumulative flags."""
    rows, flags = [], []
    for label, script, added, needs_cuda in CONFIGS:
        if (needs_cuda and device.type != "cuda") or (added == ["--compile"] and not compile_model):
            continue
        flags = flags + added
        rows.append((label, script, list(flags)))
    if grad_accum_steps > 1:
        rows.append((f"+ {grad_accum_steps}x larger batch by gradient accumulation", "01_opt_single_gpu.py",
                     flags + ["--grad-accum-steps", str(grad_accum_steps)]))
    return rows


def run_row(script: str, flags: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    metrics = workdir / "metrics.json"
    cmd = [sys.executable, str(HERE / script), "--device", args.device, "--model", args.model,
           "--context-length", str(args.context_length), "--batch-size", str(args.batch_size),
           "--drop-rate", str(args.drop_rate),
           "--max-steps", str(args.warmup_steps + args.steps), "--warmup-steps", str(args.warmup_steps),
           "--eval-freq", "1000000", "--eval-iter", "1" if script == "00_orig.py" else "0",
           "--output-dir", str(workdir), "--metrics-json", str(metrics), "--no-progress", *flags]
    if args.text_file is not None:
        cmd += ["--text-file", str(args.text_file)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not metrics.exists():
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(metrics.read_text())


def measure_peaks(device: torch.device) -> dict[str, float]:
    """Matrix-product FLOP/s in each precision the rows can use on this device."""
    peaks = {"fp32": measure_matmul_flops(device, torch.float32)}
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        peaks["tf32"] = measure_matmul_flops(device, torch.float32, size=8192)
        torch.set_float32_matmul_precision("highest")
        peaks["fp32"] = measure_matmul_flops(device, torch.float32, size=8192)
        peaks["bf16"] = measure_matmul_flops(device, torch.bfloat16, size=8192)
    return peaks


def mean_peaks(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: (before[k] + after[k]) / 2 for k in before}


def format_table(results: list[dict]) -> str:
    base = results[0].get("tokens_per_s")
    lines = ["| configuration | tokens/s | vs. 00 | peak memory (GiB) | model TFLOP/s | % of measured matmul | MFU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | |")
            continue
        tps, flops, precision, peaks = r["tokens_per_s"], r["model_flops_per_s"], r["precision"], r["matmul_peaks"]
        of_matmul = (f"{flops / peaks[precision]:.0%} of {peaks[precision] / 1e12:.3f} ({precision})"
                     if precision in peaks else "")
        util = "unknown" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['label']} | {tps:,.0f} | {tps / base:.2f}x | {r['peak_memory_bytes'] / 2**30:.2f} | "
                     f"{flops / 1e12:.3f} | {of_matmul} | {util} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = get_device(args.device)
        if args.steps < 1 or args.warmup_steps < 0 or args.grad_accum_steps < 1:
            raise ValueError("--steps and --grad-accum-steps must be >= 1 and --warmup-steps >= 0.")
        if not 0 <= args.drop_rate < 1:
            raise ValueError(f"--drop-rate must be in [0, 1), got {args.drop_rate}.")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.device = device.type
    rows = rows_for(device, args.grad_accum_steps, compile_model=not args.no_compile)[:args.only]
    print(f"Device: {device_name(device)}, {torch.get_num_threads()} CPU threads.", flush=True)
    print(f"Model {args.model}, context {args.context_length}, micro-batch {args.batch_size}, dropout "
          f"{args.drop_rate}; {args.warmup_steps} untimed + {args.steps} timed steps per row.", flush=True)
    peaks = measure_peaks(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, script, flags) in enumerate(rows):
            result = {"label": label, "script": script, "flags": flags,
                      **run_row(script, flags, args, Path(tmp) / f"row{i}")}
            peaks_after = measure_peaks(device)
            result["matmul_peaks"] = mean_peaks(peaks, peaks_after)
            peaks = peaks_after
            results.append(result)
            summary = result.get("error") or f"{result['tokens_per_s']:,.0f} tokens/s"
            matmul = ", ".join(f"{k} {v / 1e12:.3f}" for k, v in result["matmul_peaks"].items())
            print(f"[{i + 1}/{len(rows)}] {label}: {summary}; matmul around it: {matmul} TFLOP/s  "
                  f"({script} {' '.join(flags)})", flush=True)
    print()
    print(format_table(results))
    if args.output_json is not None:
        write_json_atomic({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
