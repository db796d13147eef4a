"""Pretrain GPTModel on Project Gutenberg books prepared by prepare_dataset.py.

    python pretraining_simple.py --data-dir gutenberg_preprocessed --debug true     # tiny model, quick check
    python pretraining_simple.py --data-dir gutenberg_preprocessed --max-steps 20000
    python pretraining_simple.py --data-dir gutenberg_preprocessed --resume true    # continue exactly
    torchrun --nproc_per_node=4 pretraining_simple.py --data-dir gutenberg_preprocessed   # 4 GPUs (or CPU processes)

Writes to --output-dir: `checkpoint.pth` (model, optimizer, step, data position, RNG states
and settings; written atomically every --checkpoint-every steps, at the end and on Ctrl-C),
`log.jsonl` (per step: loss, learning rate, gradient norm, tokens/s; per evaluation:
validation loss), `loss.png` and, at the end, `model.safetensors`.

Data: the training split is one long stream of token ids (the `uint16` shards, or the
combined text files tokenized at start), cut into windows of context_length + 1 tokens.
Each epoch visits the windows in an order shuffled by (seed, epoch). One optimizer step
takes the next --batch-size windows; under torchrun each of the N processes ("ranks")
reads its own 1/N of them and DDP averages the gradients, so a run with N processes
computes the same steps as one process with the same --batch-size.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ch05_utils import (
    generate_and_print_sample,
    get_device,
    get_rng_states,
    load_checkpoint,
    save_checkpoint_atomic,
    set_rng_states,
    set_seed,
)
from lr_schedule import apply_lr, clip_gradients, lr_at_step
from prepare_dataset import EOT, load_shards
from previous_chapters import GPT_CONFIG_124M, GPTModel
from torch.nn.parallel import DistributedDataParallel

MODEL_PRESETS = {
    "124M": GPT_CONFIG_124M,
    "small": {**GPT_CONFIG_124M, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
    "tiny": {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
}
CHECKPOINT_NAME = "checkpoint.pth"
# Settings that define the run. On --resume they come from the checkpoint, so that the
# continued run computes what the uninterrupted one would have.
RUN_SETTINGS = ("model", "debug", "context_length", "drop_rate", "batch_size", "num_epochs", "max_steps",
                "lr", "initial_lr", "min_lr", "warmup_steps", "max_grad_norm", "weight_decay", "seed",
                "shuffle", "data_format")


def str2bool(value: str) -> bool:
    """Parse a command-line boolean: `--debug false` must mean False (argparse's `type=bool`
    would turn any non-empty string into True)."""
    lowered = value.lower()
    if lowered in ("true", "t", "yes", "y", "1", "on"):
        return True
    if lowered in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


#####################################
# Data
#####################################

class TokenStream:
    """The token ids of one split as one long sequence over several arrays (memory-mapped
    shards are read only where a window falls)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - self.offsets[i]
            chunk = self.arrays[i][local:local + length - filled]
            out[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
            i += 1
        return out


def load_split(data_dir: Path, split: str, data_format: str) -> TokenStream:
    """The split's tokens from the .bin shards, or by tokenizing its combined text files."""
    metadata_path = data_dir / "metadata.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"No metadata.json in {data_dir}: run prepare_dataset.py first (see README.md).")
    if data_format == "shards":
        return TokenStream(load_shards(data_dir, split))
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    tokenizer = tiktoken.get_encoding(metadata["tokenizer"])
    arrays = [np.array(tokenizer.encode((data_dir / f["file"]).read_text(encoding="utf-8"), allowed_special={EOT}),
                       dtype=np.uint16)
              for f in metadata["splits"][split]["text_files"]]
    return TokenStream(arrays)


def window_order(n_windows: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order in which epoch `epoch` visits the windows: a function of (seed, epoch)
    alone, so a resumed run recomputes it instead of storing it."""
    if not shuffle:
        return np.arange(n_windows)
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def get_batch(stream: TokenStream, windows: np.ndarray, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of the given windows (window w starts at token w * ctx)."""
    rows = np.stack([stream.read(int(w) * ctx, ctx + 1) for w in windows])
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


#####################################
# Distributed set-up
#####################################

def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process
    group: NCCL between CUDA GPUs, gloo between CPU processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, get_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise ValueError("DDP does not support Apple's MPS backend: use --device cpu under torchrun.")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return value


#####################################
# Evaluation, logging, plotting
#####################################

@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: TokenStream, n_windows: int, ctx: int, batch_size: int,
             rank: int, world_size: int, device: torch.device) -> float:
    """Mean loss over the first `n_windows` windows of the validation stream: a fixed token
    budget, so that every evaluation of the run measures the same text."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, number of windows)
    mine = np.arange(rank, n_windows, world_size)
    for i in range(0, len(mine), batch_size):
        inputs, targets = get_batch(stream, mine[i:i + batch_size], ctx)
        logits = model(inputs.to(device))
        losses = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="none")
        total[0] += losses.view(len(inputs), -1).mean(dim=1).sum().double()
        total[1] += len(inputs)
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def read_log(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The JSON lines of log.jsonl, only those up to `up_to_step` if given."""
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in entries if up_to_step is None or e["step"] <= up_to_step]


def plot_log(entries: list[dict], path: Path) -> None:
    """Training loss per step and validation loss per evaluation, against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in entries if "loss" in e]
    val = [e for e in entries if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["tokens_seen"] for e in train], [e["loss"] for e in train], alpha=0.6, label="Training loss (per step)")
    ax.plot([e["tokens_seen"] for e in val], [e["val_loss"] for e in val], "o-", label="Validation loss")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#####################################
# Training
#####################################

class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag that the loop checks between steps,
    so the checkpoint written on the way out is that of a completed step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-dir", type=Path, default=Path("gutenberg_preprocessed"),
        help="Output folder of prepare_dataset.py (with metadata.json).")
    add("--data-format", choices=("shards", "text"), default="shards",
        help="Read the uint16 token shards, or tokenize the combined text files at start.")
    add("--output-dir", type=Path, default=Path("model_checkpoints"))
    add("--model", choices=sorted(MODEL_PRESETS), default="124M", help="Model shape.")
    add("--debug", type=str2bool, nargs="?", const=True, default=False,
        help="Use the tiny model (context 32, 2 layers), for quick checks.")
    add("--context-length", type=int, default=None, help="Override the preset's context length.")
    add("--drop-rate", type=float, default=None, help="Override the preset's dropout rate.")
    add("--batch-size", type=int, default=8, help="Windows per optimizer step, over all processes together.")
    add("--num-epochs", type=int, default=1, help="Passes over the training split (unless --max-steps is set).")
    add("--max-steps", type=int, default=None, help="Length of the run in optimizer steps.")
    add("--lr", type=float, default=5e-4, help="Peak learning rate (AdamW).")
    add("--initial-lr", type=float, default=1e-5, help="Learning rate at the start of warm-up.")
    add("--min-lr", type=float, default=5e-5, help="Learning rate at the end of cosine decay.")
    add("--warmup-steps", type=int, default=None, help="Linear warm-up steps (default: 5%% of the run).")
    add("--max-grad-norm", type=float, default=1.0, help="Clip the global gradient norm after warm-up (0: off).")
    add("--weight-decay", type=float, default=0.1)
    add("--shuffle", type=str2bool, nargs="?", const=True, default=True, help="Shuffle the windows each epoch.")
    add("--seed", type=int, default=123)
    add("--eval-freq", type=int, default=100, help="Evaluate every N steps.")
    add("--eval-tokens", type=int, default=65_536, help="Validation tokens per evaluation.")
    add("--start-context", default="Every effort moves you", help="Prompt of the sample printed at each evaluation.")
    add("--checkpoint-every", type=int, default=500, help="Save a checkpoint every N steps (0: only at the end).")
    add("--stop-after", type=int, default=None,
        help="Save and exit after N steps of this invocation, to continue later with --resume (time-limited jobs).")
    add("--resume", type=str2bool, nargs="?", const=True, default=False,
        help="Continue from --output-dir/checkpoint.pth with the checkpoint's settings.")
    add("--overwrite", type=str2bool, nargs="?", const=True, default=False,
        help="Start over even if --output-dir holds a checkpoint.")
    add("--device", default="auto", help="auto, cpu, cuda or mps.")
    add("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "num_epochs", "eval_freq", "eval_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for name in ("max_steps", "stop_after", "context_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.checkpoint_every < 0 or args.max_grad_norm < 0:
        parser.error("--checkpoint-every and --max-grad-norm must be >= 0.")
    if not (args.data_dir / "metadata.json").is_file():
        parser.error(f"--data-dir {args.data_dir} has no metadata.json: run prepare_dataset.py first.")


def model_config(args: argparse.Namespace) -> dict:
    cfg = dict(MODEL_PRESETS["tiny" if args.debug else args.model])
    if args.context_length is not None:
        cfg["context_length"] = args.context_length
    if args.drop_rate is not None:
        cfg["drop_rate"] = args.drop_rate
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    checkpoint_path = args.output_dir / CHECKPOINT_NAME
    checkpoint = None
    if checkpoint_path.is_file():
        if args.resume:
            checkpoint = load_checkpoint(checkpoint_path)
            for name in RUN_SETTINGS:  # the run continues with the settings it started with
                setattr(args, name, checkpoint["settings"][name])
        elif not args.overwrite:
            parser.error(f"{checkpoint_path} exists: pass --resume true to continue it, or --overwrite true "
                         "to start over, or choose another --output-dir.")

    try:
        rank, world_size, device = setup_distributed(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.batch_size % world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world_size}).")
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)

    cfg = model_config(args)
    ctx = cfg["context_length"]
    train_stream = load_split(args.data_dir, "train", args.data_format)
    val_stream = load_split(args.data_dir, "val", args.data_format)
    n_windows = max(0, (len(train_stream) - 1) // ctx)
    steps_per_epoch = n_windows // args.batch_size
    if steps_per_epoch == 0:
        parser.error(f"The training split ({len(train_stream):,} tokens) is too small for one batch of "
                     f"{args.batch_size} windows of {ctx} tokens: prepare more books or lower --batch-size.")
    n_val_windows = min(max(1, args.eval_tokens // ctx), (len(val_stream) - 1) // ctx)
    if n_val_windows < 1:
        parser.error(f"The validation split ({len(val_stream):,} tokens) is shorter than one window of {ctx} tokens.")
    total_steps = args.max_steps or args.num_epochs * steps_per_epoch
    if args.warmup_steps is None:
        args.warmup_steps = max(1, total_steps // 20) if total_steps > 1 else 0
    try:
        lr_at_step(0, total_steps, args.lr, args.warmup_steps, args.initial_lr, args.min_lr)
    except ValueError as err:
        parser.error(str(err))

    set_seed(args.seed)
    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, epoch, cursor, tokens_seen = 0, 0, 0, 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.output_dir / "log.jsonl"
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch, cursor, tokens_seen = (checkpoint[k] for k in ("step", "epoch", "cursor", "tokens_seen"))
        rng = checkpoint["rng"]
        if len(rng) == world_size:
            set_rng_states(rng[rank])
        else:
            say(f"note: the checkpoint has RNG states of {len(rng)} process(es), this run has {world_size}; "
                "dropout draws differ from an uninterrupted run.")
            set_seed(args.seed + step + rank)
        say(f"Resuming at step {step} of {total_steps} (epoch {epoch}, window {cursor})")
    else:
        torch.manual_seed(args.seed + rank)  # each process its own dropout draws
    if is_main:
        for stale in args.output_dir.glob(f"{CHECKPOINT_NAME}.*.tmp"):
            stale.unlink()  # left by a process killed while saving
        kept = read_log(log_path, up_to_step=step - 1) if checkpoint is not None else []
        log_path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")

    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else model
    tokenizer = tiktoken.get_encoding("gpt2")
    per_rank = args.batch_size // world_size
    order = window_order(n_windows, epoch, args.seed, args.shuffle)
    stop = StopRequest()

    def save_checkpoint() -> None:
        rng = [get_rng_states()]
        if world_size > 1:
            rng = [None] * world_size
            dist.all_gather_object(rng, get_rng_states())
        if is_main:
            settings = {name: getattr(args, name) for name in RUN_SETTINGS}
            save_checkpoint_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                "cursor": cursor, "tokens_seen": tokens_seen, "rng": rng, "settings": settings, "config": cfg,
            }, checkpoint_path)

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not is_main or args.no_progress, desc="Training")
    log = open(log_path, "a", encoding="utf-8") if is_main else None
    steps_this_run, exit_code = 0, 0
    model.train()
    try:
        while step < total_steps:
            start = time.perf_counter()
            lr = lr_at_step(step, total_steps, args.lr, args.warmup_steps, args.initial_lr, args.min_lr)
            apply_lr(optimizer, lr)
            windows = order[cursor + rank * per_rank:cursor + (rank + 1) * per_rank]
            inputs, targets = get_batch(train_stream, windows, ctx)
            optimizer.zero_grad(set_to_none=True)
            logits = ddp_model(inputs.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
            loss.backward()
            clip = args.max_grad_norm if args.max_grad_norm > 0 and step >= args.warmup_steps else None
            grad_norm = clip_gradients(model, clip)
            optimizer.step()

            step += 1
            steps_this_run += 1
            tokens_seen += args.batch_size * ctx
            cursor += args.batch_size
            if cursor + args.batch_size > n_windows:  # the epoch is over: reshuffle
                epoch, cursor = epoch + 1, 0
                order = window_order(n_windows, epoch, args.seed, args.shuffle)
            mean_loss = all_reduce_mean(loss.detach(), world_size).item()
            elapsed = time.perf_counter() - start
            entry = {"step": step - 1, "epoch": epoch, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(),
                     "tokens_seen": tokens_seen, "tokens_per_s": round(args.batch_size * ctx / elapsed, 1)}
            if is_main:
                log.write(json.dumps(entry) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}")

            if (step - 1) % args.eval_freq == 0 or step == total_steps:
                val_loss = evaluate(model, val_stream, n_val_windows, ctx, per_rank, rank, world_size, device)
                if is_main:
                    log.write(json.dumps({"step": step - 1, "tokens_seen": tokens_seen, "val_loss": val_loss}) + "\n")
                    log.flush()
                    bar.write(f"step {step - 1}: train loss {mean_loss:.3f}, val loss {val_loss:.3f}")
                    generate_and_print_sample(model, tokenizer, device, args.start_context, print_fn=bar.write)
                    plot_log(read_log(log_path), args.output_dir / "loss.png")

            stop_flag = torch.tensor([float(stop.requested)], device=device)
            if world_size > 1:  # every process must stop after the same step
                dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
            interrupted = stop_flag.item() > 0
            if (interrupted or (args.stop_after and steps_this_run >= args.stop_after)
                    or (args.checkpoint_every and step % args.checkpoint_every == 0) or step == total_steps):
                if is_main:
                    log.flush()
                save_checkpoint()
            if interrupted:
                say(f"\nInterrupted: saved step {step} to {checkpoint_path}; continue with --resume true.")
                exit_code = 130
                break
            if args.stop_after and steps_this_run >= args.stop_after and step < total_steps:
                say(f"Stopped after {steps_this_run} steps: saved step {step}; continue with --resume true.")
                break
    finally:
        bar.close()
        if log is not None:
            log.close()

    if is_main and step == total_steps:
        from safetensors.torch import save_file

        save_file(model.state_dict(), args.output_dir / "model.safetensors")
        plot_log(read_log(log_path), args.output_dir / "loss.png")
        say(f"Done: {step} steps, {tokens_seen:,} tokens. Wrote {args.output_dir / 'model.safetensors'}")
    if world_size > 1:
        dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
