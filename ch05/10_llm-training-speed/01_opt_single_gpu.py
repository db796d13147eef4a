"""The chapter's pretraining on one device, with every speed optimization behind a flag.

    python 01_opt_single_gpu.py --device cuda --tf32 --fused-adamw --pin-memory --bf16 \\
        --native-ops --sdpa --compile --pad-vocab --no-decay-bias-norm --grad-accum-steps 4
    python 01_opt_single_gpu.py --device cpu --model small --max-steps 20 --sdpa --native-ops
    python 01_opt_single_gpu.py ... --resume          # continue an interrupted run exactly

With no flag it computes what `00_orig.py` computes (plus a warm-up + cosine learning
rate schedule), through a loop that reads the data by step number. Each flag swaps in
one optimization (see `speed_train.py`), so `speed_benchmark.py` can measure each one's
effect. At the end it prints tokens/s (synchronized timers, warm-up steps excluded),
model FLOP/s, MFU where the device's peak is known, and peak memory.

Writes to --output-dir: `checkpoint.pth` (atomic), `losses.json`, `loss.png`.
"""

import argparse
import sys

from ch05_utils import get_device
from speed_train import (
    add_optimization_arguments,
    check_optimization_arguments,
    enable_device_settings,
    finish_run,
    make_trainer,
)
from speed_utils import (
    add_common_arguments,
    check_common_arguments,
    default_text_path,
    device_name,
    flops_per_token,
    model_config,
    write_token_file,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    add_optimization_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_common_arguments(args)
        device = get_device(args.device)
        check_optimization_arguments(args, device)
        enable_device_settings(args, device)
        cfg = model_config(args)
        token_path = args.output_dir / "tokens.npy"
        write_token_file(args.text_file or default_text_path(), token_path)
        trainer = make_trainer(args, cfg, device, token_path)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    flags = [f"--{k.replace('_', '-')}" for k, v in sorted(vars(args).items()) if v is True
             and k not in ("resume", "overwrite", "no_progress")]
    print(f"Training {cfg['n_layers']}-layer model (context {cfg['context_length']}) on {device_name(device)} "
          f"for {trainer.total_steps} steps of {trainer.tokens_per_step:,} tokens; "
          f"{flops_per_token(cfg) / 1e6:,.1f} MFLOP/token. Optimizations: {' '.join(flags) or 'none'}.")
    trainer.run(progress_bar=not args.no_progress)
    finish_run(trainer, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
