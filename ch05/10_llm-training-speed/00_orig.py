"""The baseline: chapter 5's training code, with a longer context, a bigger batch and a larger book.

    python 00_orig.py --device cuda                   # 124M shape, context 1024, Tiny Shakespeare
    python 00_orig.py --device cpu --model tiny --context-length 64 --max-steps 20
    python 00_orig.py ... --resume                    # continue an interrupted run exactly

Nothing here is faster than in the chapter: the chapter's `GPTModel`, data loader,
AdamW and `train_model_simple` run unchanged. This script only adds a throughput
meter around them, so `01_opt_single_gpu.py` can be compared with it. Timing ticks
after every optimizer step (synchronizing the device first); the first --warmup-steps
steps and every step that also ran an evaluation or printed a sample are left out.

Writes to --output-dir: `checkpoint.pth` (atomic), `losses.json`, `loss.png`.
"""

import argparse
import sys

import torch
from ch05_utils import (
    TrainProgress,
    create_train_val_loaders,
    get_device,
    get_rng_states,
    load_checkpoint,
    plot_losses,
    read_text_file,
    save_checkpoint_atomic,
    set_rng_states,
    set_seed,
    train_model_simple,
)
from previous_chapters import GPTModel, get_tokenizer
from speed_utils import (
    ThroughputMeter,
    add_common_arguments,
    check_common_arguments,
    default_text_path,
    device_name,
    flops_per_token,
    format_report,
    model_config,
    synchronize,
    throughput_report,
    write_json_atomic,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--start-context", default="First Citizen:",
                        help="Prompt for the sample printed after each epoch.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_common_arguments(args)
        if args.eval_iter < 1:
            raise ValueError("--eval-iter must be at least 1: the chapter's loop always evaluates.")
        device = get_device(args.device)
        text = read_text_file(args.text_file or default_text_path())
        cfg = model_config(args)
        set_seed(args.seed)
        train_loader, val_loader = create_train_val_loaders(text, cfg, args.batch_size, seed=args.seed)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    checkpoint_path = args.output_dir / "checkpoint.pth"
    progress = TrainProgress()
    if args.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        if checkpoint["config"] != cfg:
            print(f"error: {checkpoint_path} was trained with config {checkpoint['config']}, not {cfg}; "
                  "use the same settings or another --output-dir.", file=sys.stderr)
            return 2
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        progress = TrainProgress(**checkpoint["progress"])
        set_rng_states(checkpoint["rng"])
        print(f"Resuming from {checkpoint_path}: epoch {progress.epoch + 1}, step {progress.global_step + 1}.")

    def save(progress: TrainProgress) -> None:
        save_checkpoint_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg,
                                "progress": progress.to_dict(), "rng": get_rng_states()}, checkpoint_path)

    meter = ThroughputMeter(args.warmup_steps, sync=lambda: synchronize(device))
    tokens_per_step = args.batch_size * cfg["context_length"]

    def on_step(progress: TrainProgress) -> None:
        """Called by train_model_simple after every step: tick the meter, maybe save."""
        evaluated = progress.global_step % args.eval_freq == 0
        sampled = progress.batches_done == 0  # an epoch ended and a sample was generated
        meter.stop(tokens_per_step, discard=evaluated or sampled)
        if args.checkpoint_every and (progress.global_step + 1) % args.checkpoint_every == 0:
            save(progress)
        meter.start()

    print(f"Training {cfg['n_layers']}-layer model (context {cfg['context_length']}) on {device_name(device)}: "
          f"{len(train_loader)} batches of {tokens_per_step:,} tokens per epoch; "
          f"{flops_per_token(cfg) / 1e6:,.1f} MFLOP/token.")
    meter.start()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, device, num_epochs=args.num_epochs,
        eval_freq=args.eval_freq, eval_iter=args.eval_iter, start_context=args.start_context,
        tokenizer=get_tokenizer(), progress=progress, max_steps=args.max_steps, on_step=on_step,
        progress_bar=not args.no_progress,
    )
    save(progress)

    report = throughput_report(meter, cfg, device, precision="fp32")
    report["tokens_per_step"] = tokens_per_step
    print(format_report(report))
    write_json_atomic({"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen},
                      args.output_dir / "losses.json")
    if args.metrics_json is not None:
        write_json_atomic(report, args.metrics_json)
    if train_losses:
        epochs_seen = [i * args.eval_freq / len(train_loader) for i in range(len(train_losses))]
        plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, args.output_dir / "loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
