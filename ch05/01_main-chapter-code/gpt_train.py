"""Pretrain a GPT model on a text file, as in chapter 5.

From Python, the book's way (trains on the-verdict and returns the losses and model):

    from gpt_train import main
    train_losses, val_losses, tokens_seen, model = main(GPT_CONFIG_124M, OTHER_SETTINGS)

From the command line, with checkpoints you can resume:

    python gpt_train.py                      # the chapter's run: 124M shape, the-verdict, 10 epochs
    python gpt_train.py --model tiny --num-epochs 2
    python gpt_train.py --resume             # continue an interrupted run exactly

The command writes to --output-dir: `checkpoint.pth` (model, optimizer, progress, RNG
states, config and settings; written atomically at the end, every --save-every-minutes,
and on Ctrl-C), `loss.png` and `losses.json`.
"""

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ch05_utils import (
    FolderInUseError,
    RunLock,
    create_train_val_loaders,
    get_device,
    get_rng_states,
    load_checkpoint,
    publish_atomic,
    read_text_file,
    save_checkpoint_atomic,
    set_rng_states,
    set_seed,
    sha256_of,
    the_verdict_path,
)
from previous_chapters import (  # noqa: F401  (the book's gpt_train.py defines or imports these names)
    GPT_CONFIG_124M,
    GPTModel,
    TrainProgress,
    calc_loss_batch,
    calc_loss_loader,
    create_dataloader_v1,
    evaluate_model,
    generate,
    generate_and_print_sample,
    generate_text_simple,
    get_tokenizer,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
    train_model_simple,
)

MAX_CONTEXT_LENGTH = 1024  # GPT-2's position embeddings; longer contexts are not GPT-2 shaped
MODEL_PRESETS = {
    "124M": GPT_CONFIG_124M,  # the chapter's model (context 256)
    "small": {**GPT_CONFIG_124M, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
    "tiny": {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
}
CHECKPOINT_NAME = "checkpoint.pth"
LOCK_NAME = ".gpt_train.lock"
# Settings --resume may change; every other setting is the checkpoint's.
CHANGEABLE_ON_RESUME = {"num_epochs", "max_steps", "checkpoint_every", "save_every_minutes", "device",
                        "no_progress", "resume", "overwrite", "output_dir"}


@dataclass
class TrainingRun:
    """What the training loop works on: built the same way by `main` and the CLI."""
    model: GPTModel
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader


def setup_run(cfg: dict, text: str, batch_size: int, learning_rate: float, weight_decay: float,
              device: torch.device, seed: int = 123) -> TrainingRun:
    """Seed, split `text` 90/10 into the chapter's loaders, and build model and AdamW."""
    set_seed(seed)
    train_loader, val_loader = create_train_val_loaders(text, cfg, batch_size, seed=seed)
    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    return TrainingRun(model, optimizer, train_loader, val_loader)


#####################################
# The book's entry point
#####################################

def main(gpt_config: dict, settings: dict):
    """The book's `main`: train `gpt_config` on the-verdict with `settings` (keys
    learning_rate, num_epochs, batch_size, weight_decay), evaluating every 5 steps on one
    batch. Reads ./the-verdict.txt if it is there (as the book does), else the verified
    copy (`$CH05_DATA_DIR` or a download). Returns (train_losses, val_losses,
    tokens_seen, model) and writes no files.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = Path("the-verdict.txt")
    text = read_text_file(local if local.is_file() else the_verdict_path())
    run = setup_run(gpt_config, text, settings["batch_size"], settings["learning_rate"],
                    settings["weight_decay"], device)
    train_losses, val_losses, tokens_seen = train_model_simple(
        run.model, run.train_loader, run.val_loader, run.optimizer, device,
        num_epochs=settings["num_epochs"], eval_freq=5, eval_iter=1,
        start_context="Every effort moves you", tokenizer=get_tokenizer(),
    )
    return train_losses, val_losses, tokens_seen, run.model


#####################################
# The command line
#####################################

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
    parser.add_argument("--save-every-minutes", type=float, default=10.0,
                        help="Save a checkpoint when this much time has passed since the last one "
                             "(0: only at the end and on Ctrl-C).")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="Also save a checkpoint every N optimizer steps (0: off).")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="Stop after this many optimizer steps in total (the run can be resumed).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from --output-dir/checkpoint.pth with its settings (starts fresh if "
                             "there is none).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start over even if --output-dir already holds a checkpoint.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject settings that cannot work, before any time is spent."""
    at_least_one = {"--num-epochs": args.num_epochs, "--batch-size": args.batch_size,
                    "--eval-freq": args.eval_freq, "--eval-iter": args.eval_iter, "--max-steps": args.max_steps}
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}.")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a number >= 0, got {args.weight_decay}.")
    if not (math.isfinite(args.save_every_minutes) and args.save_every_minutes >= 0):
        raise ValueError(f"--save-every-minutes must be a number >= 0, got {args.save_every_minutes}.")
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0: off), got {args.checkpoint_every}.")
    if args.context_length is not None and not 1 <= args.context_length <= MAX_CONTEXT_LENGTH:
        raise ValueError(f"--context-length {args.context_length} is outside what a GPT-2 model supports "
                         f"(1 to {MAX_CONTEXT_LENGTH} tokens).")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one.")


def model_config(args: argparse.Namespace) -> dict:
    cfg = dict(MODEL_PRESETS[args.model])
    if args.context_length is not None:
        cfg["context_length"] = args.context_length
    return cfg


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The settings typed on the command line (as opposed to left at their default).

    argparse fills in a default only where the namespace has no value yet, so parsing
    into a namespace pre-filled with a marker leaves the marker on every flag not given.
    """
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != "help"})
    parsed = parser.parse_args(argv, namespace=namespace)
    return {name for name, value in vars(parsed).items() if value is not marker}


def run_settings(args: argparse.Namespace) -> dict:
    """The settings a resumed run must share with the run it continues."""
    settings = {k: v for k, v in vars(args).items() if k not in CHANGEABLE_ON_RESUME}
    settings["text_file"] = None if args.text_file is None else str(args.text_file)
    return settings


def adopt_checkpoint_settings(args: argparse.Namespace, saved: dict, given: set[str]) -> None:
    """On --resume, take the checkpoint's settings; refuse a different one typed by hand."""
    for name, value in saved.items():
        if name == "text_sha256":
            continue
        current = getattr(args, name)
        if name == "text_file":  # stored as a string
            current = None if current is None else str(current)
        if name in given and current != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {current} differs from the checkpoint's {value}: --resume continues a run "
                             "with its own settings. Drop the flag, or start a new run in another --output-dir.")
        setattr(args, name, Path(value) if name == "text_file" and value is not None else value)


class StopRequest:
    """Ctrl-C or SIGTERM asks the run to stop: it saves a checkpoint after the current
    step and exits. A second Ctrl-C stops at once, without saving."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step: saving a checkpoint (Ctrl-C again to quit without saving).",
              file=sys.stderr)


class TrainingDiverged(Exception):
    """The loss or the weights stopped being finite numbers: the run ends, unsaved."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the run was saved and ends; --resume continues it."""


class CheckpointSaver:
    """Saves the run when it protects work: at the end, on a stop request, every
    `every_minutes` and every `every_steps` steps -- and never a diverged model."""

    def __init__(self, path: Path, run: TrainingRun, cfg: dict, settings: dict, every_steps: int,
                 every_minutes: float):
        self.path, self.run, self.cfg, self.settings = path, run, cfg, settings
        self.every_steps, self.every_s = every_steps, every_minutes * 60
        self.last_save = time.monotonic()
        self.count, self.bytes, self.seconds = 0, 0, 0.0

    def save(self, progress: TrainProgress) -> None:
        if not all(torch.isfinite(p).all() for p in self.run.model.parameters()):
            raise TrainingDiverged(f"the model's weights are no longer finite at step {progress.global_step + 1}: "
                                  f"training diverged. The last good checkpoint ({self.path}) is kept; "
                                  "try a smaller --lr.")
        start = time.monotonic()
        save_checkpoint_atomic({
            "model": self.run.model.state_dict(), "optimizer": self.run.optimizer.state_dict(),
            "config": self.cfg, "settings": self.settings, "progress": progress.to_dict(),
            "rng": get_rng_states(),
        }, self.path)
        self.last_save = time.monotonic()
        self.count, self.bytes = self.count + 1, self.bytes + self.path.stat().st_size
        self.seconds += self.last_save - start

    def on_step(self, progress: TrainProgress, stop: StopRequest) -> None:
        if progress.last_loss is not None and not math.isfinite(progress.last_loss):
            raise TrainingDiverged(f"the loss became {progress.last_loss} at step {progress.global_step + 1}: "
                                  f"training diverged. The last good checkpoint ({self.path}) is kept; "
                                  "try a smaller --lr.")
        every = self.every_steps and (progress.global_step + 1) % self.every_steps == 0
        overdue = self.every_s and time.monotonic() - self.last_save >= self.every_s
        if every or overdue or stop.requested:
            self.save(progress)
        if stop.requested:
            raise TrainingInterrupted(f"Stopped at step {progress.global_step + 1}; {self.path} is saved. "
                                  "Continue with --resume.")


def prepare(args: argparse.Namespace, given: set[str]) -> tuple[str, dict, dict | None]:
    """Check the output folder and the inputs; on --resume adopt the checkpoint's
    settings. Returns (text, settings, checkpoint or None)."""
    checkpoint_path = args.output_dir / CHECKPOINT_NAME
    if checkpoint_path.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{checkpoint_path} already exists: pass --resume to continue that run "
                         "or --overwrite to start a new one.")
    checkpoint = None
    if args.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path)
        if not {"model", "optimizer", "progress", "config"} <= set(checkpoint):
            raise ValueError(f"{checkpoint_path} is not a gpt_train.py checkpoint (it lacks the optimizer and "
                             "progress needed to resume). Start a new run with --overwrite or another --output-dir.")
        adopt_checkpoint_settings(args, checkpoint.get("settings", {}), given)
    text_path = args.text_file or the_verdict_path()
    text = read_text_file(text_path)
    settings = {**run_settings(args), "text_sha256": sha256_of(text_path)}
    if checkpoint is not None:
        saved_sha = checkpoint.get("settings", {}).get("text_sha256")
        if saved_sha not in (None, settings["text_sha256"]):
            raise ValueError(f"{text_path} is not the text {checkpoint_path} was trained on (its SHA-256 "
                             "differs). Resume with the same text, or start a new run in another --output-dir.")
        if checkpoint["config"] != model_config(args):
            raise ValueError(f"{checkpoint_path} was trained with config {checkpoint['config']}, not "
                             f"{model_config(args)}; use the same --model/--context-length or another --output-dir.")
    return text, settings, checkpoint


def train_cli(args: argparse.Namespace, run: TrainingRun, saver: CheckpointSaver,
              progress: TrainProgress, device: torch.device) -> None:
    """Train with checkpoints, print the final losses and a sample, write the plot."""
    stop = StopRequest()
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"Training {n_params / 1e6:.1f}M parameters on {device}: {len(run.train_loader)} batches per epoch, "
          f"{args.num_epochs} epochs.")
    tokenizer = get_tokenizer()
    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        run.model, run.train_loader, run.val_loader, run.optimizer, device,
        num_epochs=args.num_epochs, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
        start_context=args.start_context, tokenizer=tokenizer, progress=progress, max_steps=args.max_steps,
        on_step=lambda p: saver.on_step(p, stop), progress_bar=not args.no_progress,
    )
    saver.save(progress)
    print(f"Training took {(time.perf_counter() - start) / 60:.2f} minutes in this session; "
          f"{saver.count} checkpoint save(s), {saver.bytes / 1e9:.2f} GB written in {saver.seconds:.1f} s.")
    write_losses(args.output_dir, train_losses, val_losses, tokens_seen, progress, len(run.train_loader))
    # The periodic evaluations may end a few steps before training does: measure once more.
    final_train, final_val = evaluate_model(run.model, run.train_loader, run.val_loader, device, args.eval_iter)
    print(f"Final losses (after step {progress.global_step + 1}): training {final_train:.3f}, "
          f"validation {final_val:.3f}.")
    print(f"Saved {saver.path} and {args.output_dir / 'loss.png'}.")
    run.model.eval()
    idx = text_to_token_ids(args.start_context, tokenizer).to(device)
    out = generate(run.model, idx, max_new_tokens=50, context_size=saver.cfg["context_length"])
    print("Generated text:\n" + token_ids_to_text(out, tokenizer))


def write_losses(output_dir: Path, train_losses, val_losses, tokens_seen, progress: TrainProgress,
                 batches_per_epoch: int) -> None:
    """losses.json and loss.png, each written beside and renamed into place."""
    import matplotlib.pyplot as plt

    losses = {"train_losses": train_losses, "val_losses": val_losses, "tokens_seen": tokens_seen}
    publish_atomic(output_dir / "losses.json", lambda tmp: tmp.write_text(json.dumps(losses, indent=1)))
    if train_losses:
        epochs_seen = torch.linspace(0, progress.epoch + progress.batches_done / batches_per_epoch,
                                     len(train_losses)).tolist()
        fig = plot_losses(epochs_seen, tokens_seen, train_losses, val_losses)
        publish_atomic(output_dir / "loss.png", lambda tmp: fig.savefig(tmp, dpi=120))
        plt.close(fig)


def cli(argv: list[str] | None = None) -> int:
    """The command line: `python gpt_train.py --help`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        device = get_device(args.device)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(args.output_dir, LOCK_NAME):
            text, settings, checkpoint = prepare(args, given_flags(parser, argv))
            run = setup_run(model_config(args), text, args.batch_size, args.lr, args.weight_decay, device, args.seed)
            progress = TrainProgress()
            if checkpoint is not None:
                run.model.load_state_dict(checkpoint["model"], strict=False)  # files of older versions lack the mask
                run.optimizer.load_state_dict(checkpoint["optimizer"])
                progress = TrainProgress(**checkpoint["progress"])
                set_rng_states(checkpoint["rng"])
                print(f"Resuming from {args.output_dir / CHECKPOINT_NAME}: epoch {progress.epoch + 1}, "
                      f"step {progress.global_step + 1}.")
            saver = CheckpointSaver(args.output_dir / CHECKPOINT_NAME, run, model_config(args), settings,
                                    args.checkpoint_every, args.save_every_minutes)
            train_cli(args, run, saver, progress, device)
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("Interrupted without saving; --resume continues from the last checkpoint.", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError, FolderInUseError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
