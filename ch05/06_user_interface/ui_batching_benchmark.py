"""How much do shared forward passes help? Total tokens/s of 8 chat sessions vs 1.

    python ui_batching_benchmark.py                       # 124M shape, 8 sessions x 64 tokens
    python ui_batching_benchmark.py --sessions 4 --new-tokens 32
    python ui_batching_benchmark.py --model tiny --new-tokens 8 --repeats 1

With the same random weights in one process, `ui_batching.Batcher` (what the chat apps
use) generates, round after round: one session alone, then `--sessions` sessions that
all start at once. Both with greedy decoding and with the apps' default sampling
(temperature 0.7, top-k 50, top-p 0.95, one seed per session). Each figure is the best
of the rounds. Every batched reply is checked against the reply the same session gets
from `generate_stream` alone, with its seed. Last, one batched step is timed with the
BLAS library's matrix products and with oneDNN's packed weights (what the batcher uses).
"""

import argparse
import sys
import time

import torch
from gpt_kv_cache import decode_rows, decode_threads, forward_cached, generate_stream, inference_weights
from ui_batching import Batcher
from ui_generation_benchmark import BENCHMARK_CONFIGS, build_model

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "sampled (app defaults)": {"temperature": 0.7, "top_k": 50, "top_p": 0.95},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BENCHMARK_CONFIGS), default="124M", help="Model shape.")
    parser.add_argument("--sessions", type=int, default=8, help="Sessions generating at the same time.")
    parser.add_argument("--new-tokens", type=int, default=64, help="Tokens per reply.")
    parser.add_argument("--repeats", type=int, default=2, help="Rounds (the best time of each kind counts).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for batched steps (default: PyTorch's; one row uses "
                             "gpt_kv_cache.decode_threads()).")
    parser.add_argument("--seed", type=int, default=123, help="Seed of the random weights.")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    if min(args.sessions, args.new_tokens, args.repeats) < 1:
        return "--sessions, --new-tokens and --repeats must be at least 1."
    if args.threads is not None and args.threads < 1:
        return f"--threads must be at least 1, got {args.threads}."
    if 8 + args.new_tokens > BENCHMARK_CONFIGS[args.model]["context_length"]:
        return "--new-tokens does not fit the model's context with the prompts."
    return None


def prompts(n: int) -> list[list[int]]:
    """n different prompts of 3 to 8 tokens."""
    return [[(17 * i + 3 * j) % 50000 + 100 for j in range(3 + i % 6)] for i in range(n)]


def timed(batcher: Batcher, batch: list[list[int]], n: int, settings: dict) -> tuple[float, list[list[int]]]:
    """Seconds until every request of `batch` (submitted at once) has its n tokens, and the replies."""
    start = time.perf_counter()
    requests = [batcher.submit(p, n, seed=100 + i, **settings) for i, p in enumerate(batch)]
    replies = [list(r) for r in requests]
    return time.perf_counter() - start, replies


def measure(batcher: Batcher, model, args: argparse.Namespace, name: str, settings: dict) -> None:
    batch = prompts(args.sessions)
    timed(batcher, batch[:1], 4, settings)
    timed(batcher, batch, 4, settings)  # warm-up: compiling, packing the weights
    best_one, best_all, replies = float("inf"), float("inf"), []
    for _ in range(args.repeats):
        seconds, _ = timed(batcher, batch[:1], args.new_tokens, settings)
        best_one = min(best_one, seconds)
        seconds, replies = timed(batcher, batch, args.new_tokens, settings)
        best_all = min(best_all, seconds)
    alone = [list(generate_stream(model, p, args.new_tokens, generator=torch.Generator().manual_seed(100 + i),
                                  **settings)) for i, p in enumerate(batch)]
    same = sum(a == b for a, b in zip(replies, alone, strict=True))
    one, total = args.new_tokens / best_one, args.sessions * args.new_tokens / best_all
    print(f"{name:<24} 1 session {one:7.1f} tokens/s | {args.sessions} sessions {total:7.1f} tokens/s in total "
          f"= {total / one:4.2f}x | replies equal to generating alone: {same}/{args.sessions}")


@torch.inference_mode()
def packing_comparison(model, rows: int, steps: int = 5) -> None:
    """Seconds of one batched step with the BLAS library's products and with oneDNN's packed weights."""
    best = {}
    for name, weights in (("BLAS (F.linear)", inference_weights(model)),
                          ("oneDNN, packed weights", inference_weights(model, packed=True))):
        cache = model.new_cache(batch_size=rows, capacity=64)
        forward_cached(weights, torch.ones(rows, 8, dtype=torch.long), cache)
        tokens, positions = torch.ones(rows, dtype=torch.long), torch.full((rows,), 8)
        best[name] = float("inf")
        for _ in range(steps + 1):  # the first one warms up
            start = time.perf_counter()
            decode_rows(weights, tokens, positions, cache, use_compile=False)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"one step of {rows} rows: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := check_args(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(BENCHMARK_CONFIGS[args.model], args.seed)
    print(f"torch {torch.__version__}, model {args.model} (fp32), {args.sessions} sessions x {args.new_tokens} "
          f"new tokens, best of {args.repeats} rounds; threads: {torch.get_num_threads()} for batched steps, "
          f"{decode_threads()} for one row")
    batcher = Batcher(model, max_batch=args.sessions)
    try:
        for name, settings in SETTINGS.items():
            measure(batcher, model, args, name, settings)
    finally:
        batcher.close()
    if args.sessions > 1:
        packing_comparison(model, args.sessions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
