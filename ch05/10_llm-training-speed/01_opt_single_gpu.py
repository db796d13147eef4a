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

import torch
from ch05_utils import get_device
from speed_settings import (
    TrainSettings,
    add_common_arguments,
    add_optimization_arguments,
    check_device_support,
    check_output_dir,
    model_config,
    settings_from_args,
)
from speed_train import StopRequest, Trainer, TrainingDiverged, enable_device_settings, finish_run, make_trainer
from speed_utils import default_text_path, device_name, flops_per_token, write_token_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    add_optimization_arguments(parser)
    return parser


def prepare(settings: TrainSettings, cfg: dict | None = None, model: torch.nn.Module | None = None) -> Trainer:
    """Everything before the first step, in the order that fails fastest: settings, device, output
    folder, token file, model. `cfg`/`model` replace the preset shape and the chapter's model."""
    device = get_device(settings.device)
    check_device_support(settings, device)
    check_output_dir(settings)
    enable_device_settings(settings)
    token_path = settings.output_dir / "tokens.npy"
    write_token_file(settings.text_file or default_text_path(), token_path)
    return make_trainer(settings, cfg or model_config(settings), device, token_path, model=model)


def train(trainer: Trainer) -> dict:
    """Run the steps (Ctrl-C/SIGTERM: save and stop), then report; returns the throughput report."""
    settings, cfg = trainer.settings, trainer.cfg
    print(f"Training {cfg['n_layers']}-layer model (context {cfg['context_length']}) on "
          f"{device_name(trainer.device)} for {trainer.total_steps} steps of {trainer.tokens_per_step:,} tokens; "
          f"{flops_per_token(cfg) / 1e6:,.1f} MFLOP/token. "
          f"Optimizations: {' '.join(settings.optimization_flags()) or 'none'}.")
    with StopRequest() as stop:
        trainer.run(progress_bar=settings.progress_bar, stop=stop)
    return finish_run(trainer, settings, trainer.device)


def cli_main(argv: list[str] | None = None) -> int:
    """The command line: `python 01_opt_single_gpu.py [flags]`."""
    args = build_parser().parse_args(argv)
    try:
        trainer = prepare(settings_from_args(args))
        train(trainer)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
