"""Measure what the KV cache, scaled_dot_product_attention and torch.compile buy, and loading memory.

Generation speed depends on the architecture, not on the weights' values, so this uses
randomly initialized models: a small Llama 3.2-shaped model by default (runs on a
laptop CPU), or the real Llama 3.2 1B shape with `--size 1b` (GPU). It prints tokens
per second for each variant and its ratio to the chapter-4 way of generating (no cache,
attention written out by hand), plus the hardware it ran on.

    python benchmark_llama.py                      # small model, CPU
    python benchmark_llama.py --compile            # add torch.compile rows (slow to compile on a CPU)
    python benchmark_llama.py --size 1b --device cuda --dtype bfloat16 --compile
    python benchmark_llama.py --loading            # peak memory: naive vs low-memory safetensors loading
"""

import argparse
import multiprocessing
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from llama3 import (
    HF_LAYER_NAMES,
    HF_OTHER_NAMES,
    LLAMA32_CONFIG_1B,
    Llama3Model,
    count_unique_parameters,
    generate,
    hf_to_our_name,
)

SIZES = {
    "small": {**LLAMA32_CONFIG_1B, "vocab_size": 8192, "emb_dim": 512, "n_heads": 8, "n_kv_groups": 2,
              "n_layers": 8, "hidden_dim": 1536},
    "1b": dict(LLAMA32_CONFIG_1B),
}


def hardware(device: torch.device) -> str:
    """A one-line description of the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} PyTorch threads, torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool, repeats: int) -> float:
    """Best tokens/s over `repeats` runs after one warm-up run (which also triggers compilation)."""
    device = prompt.device
    context_size = prompt.shape[1] + new_tokens
    generate(model, prompt, new_tokens, context_size, use_cache=use_cache)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        generate(model, prompt, new_tokens, context_size, use_cache=use_cache)
        synchronize(device)
        best = max(best, new_tokens / (time.perf_counter() - start))
    return best


def set_attention(model: Llama3Model, attn_impl: str) -> None:
    for block in model.trf_blocks:
        block.att.attn_impl = attn_impl


def benchmark_generation(args: argparse.Namespace, device: torch.device) -> None:
    cfg = {**SIZES[args.size], "dtype": getattr(torch, args.dtype), "context_length": args.prompt_len + args.new_tokens}
    torch.manual_seed(0)
    with device:  # parameters are created on the device; .to() moves the RoPE tables too
        model = Llama3Model(cfg).to(device).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt_len), device=device)
    print(f"Hardware: {hardware(device)}")
    print(f"Model: {args.size} ({count_unique_parameters(model) / 1e6:.0f}M parameters, {args.dtype}), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}\n")

    variants = [("no KV cache, manual attention (chapter 4)", False, "manual", False),
                ("no KV cache, scaled_dot_product_attention", False, "sdpa", False),
                ("KV cache, manual attention", True, "manual", False),
                ("KV cache, scaled_dot_product_attention", True, "sdpa", False)]
    if args.compile:
        variants.append(("KV cache, sdpa, torch.compile", True, "sdpa", True))
    baseline = None
    print(f"{'variant':<45} {'tokens/s':>10} {'speed-up':>9}")
    for name, use_cache, attn_impl, compiled in variants:
        set_attention(model, attn_impl)
        runner = torch.compile(model) if compiled else model
        start = time.perf_counter()
        tokens_per_s = time_generation(runner, prompt, args.new_tokens, use_cache, args.repeats)
        baseline = baseline or tokens_per_s
        note = f"  (incl. {time.perf_counter() - start:.0f} s total with compilation)" if compiled else ""
        print(f"{name:<45} {tokens_per_s:>10.1f} {tokens_per_s / baseline:>8.2f}x{note}")


def our_to_hf_name(name: str) -> str:
    """The Hugging Face name of one of our parameters (the inverse of llama3.hf_to_our_name)."""
    for hf_name, ours in HF_OTHER_NAMES.items():
        if ours == name:
            return hf_name
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}." + next(hf for hf, ours in HF_LAYER_NAMES.items() if ours == rest)


def peak_rss_bytes(reset: bool = False) -> int:
    """This process's peak resident memory; with `reset`, start a new peak from now (Linux)."""
    status = Path("/proc/self/status")
    if not status.is_file():  # macOS and others: lifetime peak only (bytes on macOS, KiB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _load_and_report(mode: str, path: str, cfg: dict, queue) -> None:
    """In a fresh process: load the checkpoint one way, report the rise of peak memory in bytes."""
    from llama3 import load_llama_from_safetensors
    from safetensors.torch import load_file

    before = peak_rss_bytes(reset=True)
    if mode == "naive":
        model = Llama3Model(cfg)  # random init: one full copy
        state = {hf_to_our_name(k): v.to(cfg["dtype"]) for k, v in load_file(path).items()}  # a second copy
        model.load_state_dict(state, strict=False)
    else:
        model = load_llama_from_safetensors(cfg, [path])
    queue.put((peak_rss_bytes() - before, count_unique_parameters(model)))


def benchmark_loading(args: argparse.Namespace) -> None:
    """Peak memory of naive loading (random-init model + full state dict) vs meta-device, tensor-by-tensor loading."""
    from safetensors.torch import save_file

    cfg = {**SIZES[args.size], "dtype": getattr(torch, args.dtype), "context_length": 256}
    torch.manual_seed(0)
    model = Llama3Model(cfg)  # the checkpoint to load
    weights_mb = count_unique_parameters(model) * model.tok_emb.weight.element_size() / 2**20
    print(f"Hardware: {hardware(torch.device('cpu'))}")
    print(f"Checkpoint: {args.size}, {count_unique_parameters(model) / 1e6:.0f}M parameters = {weights_mb:.0f} MiB "
          f"in {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.safetensors")
        save_file({our_to_hf_name(name): p.detach().contiguous() for name, p in model.named_parameters()}, path)
        del model
        ctx = multiprocessing.get_context("spawn")
        for mode in ("naive", "low-memory"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_load_and_report, args=(mode, path, cfg, queue), daemon=True)
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"{mode} loading failed in its child process (exit code {proc.exitcode}; "
                                   "out of memory?); try a smaller --size or --dtype bfloat16")
            rise, _ = queue.get()
            print(f"{mode:<11} loading: peak memory rose by {rise / 2**20:6.0f} MiB = "
                  f"{rise / 2**20 / weights_mb:.2f}x the weights")


MAX_POSITIONS = LLAMA32_CONFIG_1B["context_length"]  # Llama 3.2's 131,072


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked before any model is built (argparse prints one `error:` line, exit 2)."""
    parser = argparse.ArgumentParser(prog="benchmark_llama.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="Model shape (random weights).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where to run.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Weight dtype.")
    parser.add_argument("--prompt-len", type=int, default=64, help="Prompt length in tokens.")
    parser.add_argument("--new-tokens", type=int, default=64, help="Tokens to generate per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per variant (the best counts), 1-100.")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: PyTorch's default).")
    parser.add_argument("--compile", action="store_true", help="Add a torch.compile variant.")
    parser.add_argument("--loading", action="store_true", help="Measure loading memory instead of speed.")
    args = parser.parse_args(argv)
    for flag in ("prompt_len", "new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.prompt_len + args.new_tokens > MAX_POSITIONS:
        parser.error(f"--prompt-len + --new-tokens must be at most {MAX_POSITIONS:,} (Llama 3.2's context), "
                     f"got {args.prompt_len + args.new_tokens:,}")
    if not 1 <= args.repeats <= 100:
        parser.error(f"--repeats must be between 1 and 100, got {args.repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: PyTorch's default), got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.loading:
            benchmark_loading(args)
        else:
            benchmark_generation(args, torch.device(args.device))
    except KeyboardInterrupt:  # the figures printed so far stand as they are; nothing is written to disk
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as err:
        sys.exit(f"error: {str(err).splitlines()[0]}")


if __name__ == "__main__":
    main()
