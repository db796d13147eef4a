"""The baseline: chapter 5's training code, with a longer context, a bigger batch and a larger book.

    python 00_orig.py                                 # the course's command: 124M shape, context 1024
    python 00_orig.py --device cpu --model tiny --context-length 64 --max-steps 20
    python 00_orig.py ... --resume                    # continue an interrupted run exactly

Nothing here is faster than in the chapter: the chapter's `GPTModel`, data loader,
AdamW and `train_model_simple` run unchanged. `train_model_simple_with_timing` only
adds a throughput meter around them, so `01_opt_single_gpu.py` can be compared with it.
Timing ticks after every optimizer step (synchronizing the device first); the first
--warmup-steps steps and every step that also ran an evaluation or printed a sample are
left out.

The course's names work here too: `main(gpt_config, settings)` returns
`(train_losses, val_losses, tokens_seen, model)`, and the chapter's classes and
functions (`GPTModel`, `create_dataloader_v1`, `calc_loss_loader`, ...) can be imported
from this file. Both entry points run `run_baseline`.

Writes to --output-dir: `checkpoint.pth`, `losses.json`, `loss.png` (each atomically).
Ctrl-C or SIGTERM stops after the current step and saves the checkpoint.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from ch05_utils import (
    create_train_val_loaders,
    get_device,
    get_rng_states,
    load_checkpoint,
    read_text_file,
    save_checkpoint_atomic,
    set_rng_states,
    set_seed,
)
from previous_chapters import (  # noqa: F401  (the course's 00_orig.py defines these names: import them from here)
    GELU,
    FeedForward,
    GPTDatasetV1,
    GPTModel,
    LayerNorm,
    MultiHeadAttention,
    TrainProgress,
    TransformerBlock,
    calc_loss_batch,
    calc_loss_loader,
    create_dataloader_v1,
    evaluate_model,
    generate_and_print_sample,
    generate_text_simple,
    get_tokenizer,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
)
from speed_settings import TrainSettings, add_common_arguments, check_output_dir, model_config, settings_from_args
from speed_train import StopRequest, TrainingDiverged, check_finite_weights
from speed_utils import (
    OutputLock,
    ThroughputMeter,
    book_text_path,
    default_text_path,
    device_name,
    flops_per_token,
    format_report,
    save_figure_atomic,
    synchronize,
    throughput_report,
    write_json_atomic,
)
from timed_training import train_model_simple_with_timing

# The course's settings for `python 00_orig.py` (its `main` gets them as arguments).
GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
                   "drop_rate": 0.1, "qkv_bias": False}
OTHER_SETTINGS = {"learning_rate": 5e-4, "num_epochs": 15, "batch_size": 8, "weight_decay": 0.1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--start-context", default=TrainSettings.start_context,
                        help="Prompt for the sample printed after each epoch.")
    return parser


def main(gpt_config: dict, settings: dict, *, text_file: str | Path | None = None, device: str = "auto",
         output_dir: str | Path | None = None, max_steps: int | None = None, progress_bar: bool = False):
    """The course's entry point: train `gpt_config` with `settings` (`learning_rate`, `num_epochs`,
    `batch_size`, `weight_decay`), evaluating every 15 steps on one batch, as the course does.

    Returns (train_losses, val_losses, tokens_seen, model). The text is `middlemarch.txt` in
    the working directory if it is there (the course's book), else Tiny Shakespeare (see
    `book_text_path`). Keyword-only extras: another `text_file`, a `device`, an `output_dir`
    for the checkpoint and losses (default: no files, as in the course), `max_steps`.
    """
    run = TrainSettings(
        text_file=book_text_path(text_file), context_length=gpt_config["context_length"],
        drop_rate=gpt_config["drop_rate"], batch_size=settings["batch_size"], num_epochs=settings["num_epochs"],
        lr=settings["learning_rate"], weight_decay=settings["weight_decay"], eval_freq=15, eval_iter=1,
        warmup_steps=1, start_context="Every effort moves you", device=device, max_steps=max_steps,
        output_dir=None if output_dir is None else Path(output_dir), overwrite=True, progress_bar=progress_bar)
    train_losses, val_losses, tokens_seen, model, _ = run_baseline(run, dict(gpt_config))
    return train_losses, val_losses, tokens_seen, model


def run_baseline(settings: TrainSettings, cfg: dict) -> tuple[list, list, list, GPTModel, dict]:
    """The chapter's training of `cfg` under the throughput meter; returns the losses, the
    tokens seen at each evaluation, the model and the throughput report."""
    check_output_dir(settings)
    with OutputLock(settings.output_dir):  # a second run on this folder is refused
        return train_baseline(settings, cfg)


def train_baseline(settings: TrainSettings, cfg: dict) -> tuple[list, list, list, GPTModel, dict]:
    """`run_baseline` once the output folder is checked and locked."""
    device = get_device(settings.device)
    text = read_text_file(settings.text_file or default_text_path())
    set_seed(settings.seed)
    train_loader, val_loader = create_train_val_loaders(text, cfg, settings.batch_size, seed=settings.seed)
    print(f"PyTorch version: {torch.__version__}\nUsing {device_name(device)}")
    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    progress = resume_if_asked(settings, cfg, model, optimizer, device)

    def save() -> None:
        if settings.checkpoint_path is not None:
            check_finite_weights(model, progress.global_step + 1, settings.checkpoint_path)
            save_checkpoint_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg,
                                    "progress": progress.to_dict(), "rng": get_rng_states()},
                                   settings.checkpoint_path)

    def on_step(progress: TrainProgress) -> None:
        if progress.train_losses and not math.isfinite(progress.train_losses[-1] + progress.val_losses[-1]):
            raise TrainingDiverged(f"The loss became {progress.train_losses[-1]} (train) / {progress.val_losses[-1]} "
                                   f"(val) at step {progress.global_step + 1}; stopped without saving. Lower --lr.")
        if settings.checkpoint_every and (progress.global_step + 1) % settings.checkpoint_every == 0:
            save()

    tokens_per_step = settings.batch_size * cfg["context_length"]
    print(f"Training {cfg['n_layers']}-layer model (context {cfg['context_length']}) on {device_name(device)}: "
          f"{len(train_loader)} batches of {tokens_per_step:,} tokens per epoch; "
          f"{flops_per_token(cfg) / 1e6:,.1f} MFLOP/token.")
    meter = ThroughputMeter(settings.warmup_steps, sync=lambda: synchronize(device))
    with StopRequest() as stop:
        losses = train_model_simple_with_timing(
            model, train_loader, val_loader, optimizer, device, settings.num_epochs, settings.eval_freq,
            settings.eval_iter, settings.start_context, get_tokenizer(), progress=progress,
            max_steps=settings.max_steps, on_step=on_step, should_stop=lambda: stop.signal is not None,
            meter=meter, progress_bar=settings.progress_bar)
    save()
    if stop.signal is not None:
        print(f"Stopped by a signal after step {progress.global_step + 1}; {settings.checkpoint_path} is saved: "
              "continue with --resume.")
    report = {**throughput_report(meter, cfg, device, precision="fp32"), "tokens_per_step": tokens_per_step}
    print(format_report(report))
    write_outputs(settings, losses, report, len(train_loader))
    return (*losses, model, report)


def resume_if_asked(settings: TrainSettings, cfg: dict, model: GPTModel, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> TrainProgress:
    """Where to start: from the checkpoint with --resume (refused if it has another config), else from scratch."""
    path = settings.checkpoint_path
    if not (settings.resume and path is not None and path.exists()):
        return TrainProgress()
    checkpoint = load_checkpoint(path, map_location=device)
    if checkpoint["config"] != cfg:
        raise ValueError(f"{path} was trained with config {checkpoint['config']}, not {cfg}; "
                         "use the same settings or another --output-dir.")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    progress = TrainProgress(**checkpoint["progress"])
    set_rng_states(checkpoint["rng"])
    print(f"Resuming from {path}: epoch {progress.epoch + 1}, step {progress.global_step + 1}.")
    return progress


def write_outputs(settings: TrainSettings, losses: tuple[list, list, list], report: dict, batches_per_epoch: int):
    """losses.json, loss.png and --metrics-json, each written atomically."""
    train_losses, val_losses, tokens_seen = losses
    if settings.metrics_json is not None:
        write_json_atomic(report, settings.metrics_json)
    if settings.output_dir is None:
        return
    write_json_atomic({"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen},
                      settings.output_dir / "losses.json")
    if train_losses:
        import matplotlib.pyplot as plt

        epochs_seen = [i * settings.eval_freq / batches_per_epoch for i in range(len(train_losses))]
        fig = plot_losses(epochs_seen, tokens_seen, train_losses, val_losses)
        save_figure_atomic(fig or plt.gcf(), settings.output_dir / "loss.png")
        plt.close("all")


def cli(argv: list[str] | None = None) -> int:
    """The command line: `python 00_orig.py [flags]`."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        if settings.eval_iter < 1:
            raise ValueError("--eval-iter must be at least 1: the chapter's loop always evaluates.")
        run_baseline(settings, model_config(settings))
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
