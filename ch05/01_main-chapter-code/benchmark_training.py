"""Measure training speed: tokens/s, matmul GFLOP/s of this machine, and model FLOPs utilization.

    python benchmark_training.py                 # the chapter's 124M shape, context 256, batch 2
    python benchmark_training.py --model tiny --steps 3

FLOPs per token follow the usual convention (Kaplan et al. 2020; PaLM appendix B):
6 * N for the weight matmuls (2 forward, 4 backward, per weight), where N counts the
weights used in matrix multiplications (every parameter except the token and position
embedding tables, which are lookups; the output head is a matmul and counts), plus
12 * n_layers * context_length * emb_dim for the attention scores and the weighted sum
of values (2 matmuls, 2 FLOPs per multiply-add, times 3 for forward and backward). The
chapter's attention computes the full T x T matrix before masking, so T is the whole
context. MFU is achieved FLOP/s divided by the peak; here the "peak" is the fp32 matmul
throughput measured on this machine by the same script (on a GPU, compare it with the
vendor's figure instead).
"""

import argparse
import sys
import time

import torch

from ch05_utils import get_device
from gpt_train import MODEL_PRESETS
from previous_chapters import GPTModel


def matmul_weights(model: GPTModel) -> int:
    """Parameters that take part in matrix multiplications (all but the embedding tables)."""
    lookups = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    return sum(p.numel() for p in model.parameters()) - lookups


def flops_per_token(n_matmul_weights: int, cfg: dict) -> int:
    """Training FLOPs per token: 6N + 12 * n_layers * context_length * emb_dim."""
    return 6 * n_matmul_weights + 12 * cfg["n_layers"] * cfg["context_length"] * cfg["emb_dim"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of an n x n matmul, the practical peak the model's matmuls can reach."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def measure_training_tokens_per_s(model: GPTModel, cfg: dict, batch_size: int, steps: int, warmup: int,
                                  device: torch.device) -> float:
    """Tokens/s of full training steps (forward, backward, AdamW) on random token ids.

    The first `warmup` steps are run but not timed: they allocate the optimizer state
    and warm the caches.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    tokens = torch.randint(0, cfg["vocab_size"], (batch_size, cfg["context_length"] + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
    synchronize(device)
    return steps * inputs.numel() / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="124M")
    parser.add_argument("--context-length", type=int, default=None, help="Override the preset's context length.")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="Timed training steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps before timing.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps.")
    args = parser.parse_args(argv)
    try:
        device = get_device(args.device)
        if min(args.batch_size, args.steps) < 1 or args.warmup < 0:
            raise ValueError("--batch-size and --steps must be at least 1, --warmup at least 0.")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    cfg = dict(MODEL_PRESETS[args.model])
    if args.context_length is not None:
        cfg["context_length"] = args.context_length
    torch.manual_seed(123)
    model = GPTModel(cfg).to(device)
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_weights(model)
    fpt = flops_per_token(n_matmul, cfg)

    gflops = measure_matmul_gflops(device)
    tokens_per_s = measure_training_tokens_per_s(model, cfg, args.batch_size, args.steps, args.warmup, device)
    achieved = tokens_per_s * fpt / 1e9

    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    print(f"device                  : {device} (torch {torch.__version__}, CPU threads: {threads})")
    print(f"model                   : {args.model}, {n_total / 1e6:.1f}M parameters "
          f"({n_matmul / 1e6:.1f}M in matmuls), context {cfg['context_length']}, batch {args.batch_size}")
    print(f"FLOPs per token         : {fpt / 1e6:.1f} MFLOP (6N + 12*L*T*d)")
    print(f"fp32 matmul peak        : {gflops:.1f} GFLOP/s (2048x2048 matmul, measured)")
    print(f"training throughput     : {tokens_per_s:.1f} tokens/s over {args.steps} steps "
          f"(after {args.warmup} warm-up)")
    print(f"achieved                : {achieved:.1f} GFLOP/s")
    print(f"MFU vs measured matmul  : {100 * achieved / gflops:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
