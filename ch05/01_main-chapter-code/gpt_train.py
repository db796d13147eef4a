"""Pretrain a GPT model on a text file, as in chapter 5, from the command line.

    python gpt_train.py                      # the chapter's run: 124M shape, the-verdict, 10 epochs
    python gpt_train.py --model tiny --num-epochs 2
    python gpt_train.py --resume             # continue an interrupted run exactly

Writes to --output-dir: `checkpoint.pth` (model, optimizer, progress, RNG states,
config; written atomically), `loss.png` and `losses.json`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ch05_utils import (
    TrainProgress,
    create_train_val_loaders,
    evaluate_model,
    generate,
    get_device,
    get_rng_states,
    load_checkpoint,
    plot_losses,
    read_text_file,
    save_checkpoint_atomic,
    set_rng_states,
    set_seed,
    text_to_token_ids,
    the_verdict_path,
    token_ids_to_text,
    train_model_simple,
)
from previous_chapters import GPT_CONFIG_124M, GPTModel, get_tokenizer

MAX_CONTEXT_LENGTH = 1024  # GPT-2's position embeddings; longer contexts are not GPT-2 shaped
MODEL_PRESETS = {
    "124M": GPT_CONFIG_124M,  # the chapter's model (context 256)
    "small": {**GPT_CONFIG_124M, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
    "tiny": {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
}
CHECKPOINT_NAME = "checkpoint.pth"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a GPT model on a text file (defaults reproduce chapter 5).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--text-file", type=Path, default=None,
                        help="UTF-8 training text. Default: the-verdict.txt, downloaded once and checked "
                             "against its SHA-256, or taken from $CH05_DATA_DIR if that is set.")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="124M", help="Model shape.")
    parser.add_argument("--context-length", type=int, default=None,
                        help=f"Override the preset's context length (at most {MAX_CONTEXT_LENGTH}).")
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate.")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-freq", type=int, default=5, help="Evaluate every N optimizer steps.")
    parser.add_argument("--eval-iter", type=int, default=5, help="Batches per split in each evaluation.")
    parser.add_argument("--start-context", default="Every effort moves you",
                        help="Prompt for the samples printed after each epoch.")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps.")
    parser.add_argument("--output-dir", type=Path, default=Path("output"))
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="Also save a checkpoint every N steps (0: only after each epoch and at the end).")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="Stop after this many optimizer steps in total (the run can be resumed).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from --output-dir/checkpoint.pth (starts fresh if there is none).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start over even if --output-dir already holds a checkpoint.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject settings that cannot work, before any time is spent."""
    positive = {"--num-epochs": args.num_epochs, "--batch-size": args.batch_size,
                "--eval-freq": args.eval_freq, "--eval-iter": args.eval_iter}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}.")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}.")
    if args.context_length is not None and not 1 <= args.context_length <= MAX_CONTEXT_LENGTH:
        raise ValueError(
            f"--context-length {args.context_length} is outside what a GPT-2 model supports "
            f"(1 to {MAX_CONTEXT_LENGTH} tokens)."
        )
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one.")


def model_config(args: argparse.Namespace) -> dict:
    cfg = dict(MODEL_PRESETS[args.model])
    if args.context_length is not None:
        cfg["context_length"] = args.context_length
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = get_device(args.device)
        text = read_text_file(args.text_file or the_verdict_path())
        cfg = model_config(args)
        checkpoint_path = args.output_dir / CHECKPOINT_NAME
        if checkpoint_path.exists() and not (args.resume or args.overwrite):
            raise ValueError(f"{checkpoint_path} already exists: pass --resume to continue that run "
                             "or --overwrite to start a new one.")
        set_seed(args.seed)
        train_loader, val_loader = create_train_val_loaders(text, cfg, args.batch_size, seed=args.seed)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    for stale in args.output_dir.glob(CHECKPOINT_NAME + ".*.tmp"):
        stale.unlink()  # left behind by a run killed while it was saving
    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    progress = TrainProgress()
    if args.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        if checkpoint["config"] != cfg:
            print(f"error: {checkpoint_path} was trained with config {checkpoint['config']}, "
                  f"not {cfg}; use the same --model/--context-length or another --output-dir.", file=sys.stderr)
            return 2
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        progress = TrainProgress(**checkpoint["progress"])
        set_rng_states(checkpoint["rng"])
        print(f"Resuming from {checkpoint_path}: epoch {progress.epoch + 1}, step {progress.global_step + 1}.")

    def save(progress: TrainProgress) -> None:
        save_checkpoint_atomic({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": cfg,
            "progress": progress.to_dict(),
            "rng": get_rng_states(),
        }, checkpoint_path)

    def on_step(progress: TrainProgress) -> None:
        every = args.checkpoint_every
        if progress.batches_done == 0 or (every and (progress.global_step + 1) % every == 0):
            save(progress)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"Training {n_params / 1e6:.1f}M parameters on {device}: {len(train_loader)} batches per epoch, "
          f"{args.num_epochs} epochs.")
    tokenizer = get_tokenizer()
    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, device,
        num_epochs=args.num_epochs, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
        start_context=args.start_context, tokenizer=tokenizer, progress=progress,
        max_steps=args.max_steps, on_step=on_step, progress_bar=not args.no_progress,
    )
    save(progress)
    elapsed = time.perf_counter() - start
    print(f"Training took {elapsed / 60:.2f} minutes in this session.")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "losses.json").write_text(json.dumps(
        {"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen}, indent=1))
    if train_losses:
        epochs_seen = torch.linspace(0, progress.epoch + progress.batches_done / len(train_loader),
                                     len(train_losses)).tolist()
        plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, args.output_dir / "loss.png")
    # The periodic evaluations may end a few steps before training does: measure once more.
    final_train, final_val = evaluate_model(model, train_loader, val_loader, device, args.eval_iter)
    print(f"Final losses (after step {progress.global_step + 1}): training {final_train:.3f}, "
          f"validation {final_val:.3f}.")
    print(f"Saved {checkpoint_path} and {args.output_dir / 'loss.png'}.")

    model.eval()
    idx = text_to_token_ids(args.start_context, tokenizer).to(device)
    out = generate(model, idx, max_new_tokens=50, context_size=cfg["context_length"])
    print("Generated text:\n" + token_ids_to_text(out, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
