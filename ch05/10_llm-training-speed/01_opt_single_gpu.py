"""The chapter's pretraining on one device, with every speed optimization behind a flag.

    python 01_opt_single_gpu.py --device cuda --tf32 --fused-adamw --pin-memory --bf16 \\
        --native-ops --sdpa --compile --pad-vocab --no-decay-bias-norm --grad-accum-steps 4
    python 01_opt_single_gpu.py --device cpu --model small --max-steps 20 --sdpa --native-ops
    python 01_opt_single_gpu.py ... --resume          # continue an interrupted run exactly

With no flag it computes what `00_orig.py` computes (plus a warm-up + cosine learning
rate schedule), through a loop that reads the data by step number. Each flag swaps in
one optimization (see `speed_train.py` and the README's table of which lines each flag
changes), so `speed_benchmark.py` can measure each one's effect. At the end it prints
tokens/s (synchronized timers, warm-up steps excluded), model FLOP/s, MFU where the
device's peak is known, and peak memory.

The course's names work here too: `main(gpt_config, settings)` trains the course's
optimized `GPTModel` (PyTorch's attention, LayerNorm and GELU; see `pytorch_gpt.py`)
with the course's choices (fused AdamW, bfloat16 weights, torch.compile, TF32 and pinned
memory on GPUs, a constant learning rate) through the same `prepare`/`train` as the
command line, and returns `(train_losses, val_losses, tokens_seen, model)`.

Writes to --output-dir: `tokens.npy`, `checkpoint.pth`, `losses.json`, `loss.png` (each
atomically). Ctrl-C or SIGTERM stops after the current step and saves the checkpoint.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from ch05_utils import get_device
from previous_chapters import (  # noqa: F401  (the course's 01_opt_single_gpu.py defines these names)
    GPTDatasetV1,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    generate_and_print_sample,
    generate_text_simple,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
)
from pytorch_gpt import FeedForward, GPTModel, PyTorchMultiHeadAttention, TransformerBlock  # noqa: F401
from speed_settings import (
    TrainSettings,
    add_common_arguments,
    add_optimization_arguments,
    check_device_support,
    check_output_dir,
    course_run_settings,
    model_config,
    settings_from_args,
)
from speed_train import (
    StopRequest,
    Trainer,
    TrainingDiverged,
    course_results,
    enable_device_settings,
    finish_run,
    make_trainer,
)
from speed_utils import (
    OutputLock,
    book_text_path,
    default_text_path,
    device_name,
    flops_per_token,
    write_token_file,
)
from timed_training import create_dataloader, train_model_simple_with_timing  # noqa: F401

# The course's settings for its optimized run (its `main` gets them as arguments):
# the vocabulary padded to a multiple of 64, and a 4x larger batch than 00's.
GPT_CONFIG_124M = {"vocab_size": 50304, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
                   "drop_rate": 0.1, "qkv_bias": False}
OTHER_SETTINGS = {"learning_rate": 5e-4, "num_epochs": 15, "batch_size": 32, "weight_decay": 0.1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    add_optimization_arguments(parser)
    return parser


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0, *,
                         pin_memory: bool | None = None) -> torch.utils.data.DataLoader:
    """The course's loader of 01: the chapter's, with pinned memory where a GPU can use it."""
    return create_dataloader(txt, batch_size, max_length, stride, shuffle, drop_last, num_workers,
                             pin_memory=pin_memory)


def main(gpt_config: dict, settings: dict, *, text_file: str | Path | None = None, device: str = "auto",
         output_dir: str | Path | None = None, max_steps: int | None = None, compile_backend: str = "inductor",
         progress_bar: bool = False) -> tuple[list, list, list, torch.nn.Module]:
    """The course's entry point: train the course's optimized `GPTModel(gpt_config)` with `settings`.

    Returns (train_losses, val_losses, tokens_seen, model), one entry per evaluation (every
    10 steps, on one validation batch); the training loss is that of the step evaluated.
    The text is `middlemarch.txt` in the working directory if it is there, else Tiny
    Shakespeare (`book_text_path`). Keyword-only extras: `text_file`, `device`,
    `output_dir` (default: no files), `max_steps`, `compile_backend` ("aot_eager" compiles
    in seconds on a CPU) and a progress bar.
    """
    on_cuda = get_device(device).type == "cuda"
    run = course_run_settings(gpt_config, settings, eval_freq=10, on_cuda=on_cuda, text_file=book_text_path(text_file),
                              device=device, output_dir=None if output_dir is None else Path(output_dir),
                              max_steps=max_steps, compile_backend=compile_backend, progress_bar=progress_bar)
    torch.manual_seed(run.seed)
    model = GPTModel(gpt_config)
    check_output_dir(run)
    with OutputLock(run.output_dir), \
            tempfile.TemporaryDirectory(prefix="speed-tokens-", ignore_cleanup_errors=True) as scratch:
        trainer = prepare(run, cfg=dict(gpt_config), model=model, token_dir=None if output_dir else Path(scratch))
        train(trainer)
    return course_results(trainer)


def prepare(settings: TrainSettings, cfg: dict | None = None, model: torch.nn.Module | None = None,
            token_dir: Path | None = None) -> Trainer:
    """Everything before the first step, in the order that fails fastest: settings, device, output
    folder, token file, model. `cfg`/`model` replace the preset shape and the chapter's model;
    the token file goes to `token_dir` (default: the output folder)."""
    device = get_device(settings.device)
    check_device_support(settings, device)
    check_output_dir(settings)
    enable_device_settings(settings)
    token_path = (token_dir or settings.output_dir) / "tokens.npy"
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


def cli(argv: list[str] | None = None) -> int:
    """The command line: `python 01_opt_single_gpu.py [flags]`."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        check_output_dir(settings)
        with OutputLock(settings.output_dir):  # a second run on this folder is refused
            train(prepare(settings))
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
