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
from dataclasses import dataclass
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


class UsageError(ValueError):
    """A bad setting found while setting up the run: reported as one `error:` line (exit code 2)."""


@dataclass
class Run:
    """What a training run is made of, fixed once it is set up."""

    args: argparse.Namespace
    cfg: dict
    rank: int
    world_size: int
    device: torch.device
    model: GPTModel
    ddp_model: torch.nn.Module  # the model itself, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    train_stream: TokenStream
    val_stream: TokenStream
    n_windows: int  # training windows of context_length + 1 tokens
    n_val_windows: int  # validation windows per evaluation
    total_steps: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ctx(self) -> int:
        return self.cfg["context_length"]

    @property
    def per_rank(self) -> int:
        return self.args.batch_size // self.world_size

    @property
    def checkpoint_path(self) -> Path:
        return self.args.output_dir / CHECKPOINT_NAME

    @property
    def log_path(self) -> Path:
        return self.args.output_dir / "log.jsonl"

    def say(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs)


@dataclass
class TrainState:
    """Where the run stands, as saved in the checkpoint.

    `step` is the number of optimizer steps completed so far, which is also the number
    (counted from 0) of the step to take next. `cursor` counts the windows of the current
    epoch already used.
    """

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    tokens_seen: int = 0


class WindowSampler:
    """Which windows each step reads: the epoch's shuffled order, cut into global batches,
    of which each process reads its own slice."""

    def __init__(self, run: Run):
        self.run = run
        self._epoch, self._order = None, None

    def windows(self, state: TrainState) -> np.ndarray:
        if state.epoch != self._epoch:
            self._epoch = state.epoch
            self._order = window_order(self.run.n_windows, state.epoch, self.run.args.seed, self.run.args.shuffle)
        start = state.cursor + self.run.rank * self.run.per_rank
        return self._order[start:start + self.run.per_rank]

    def advance(self, state: TrainState) -> None:
        """Count one completed step; start the next epoch when too few windows are left for a batch."""
        batch_size = self.run.args.batch_size
        state.step += 1
        state.tokens_seen += batch_size * self.run.ctx
        state.cursor += batch_size
        if state.cursor + batch_size > self.run.n_windows:
            state.epoch, state.cursor = state.epoch + 1, 0


#####################################
# Set-up and resume
#####################################

def load_resume_checkpoint(args: argparse.Namespace) -> dict | None:
    """The checkpoint to continue from (its settings replace the arguments'), or None to start afresh."""
    checkpoint_path = args.output_dir / CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        return None
    if not args.resume:
        if args.overwrite:
            return None
        raise UsageError(f"{checkpoint_path} exists: pass --resume true to continue it, or --overwrite true "
                         "to start over, or choose another --output-dir.")
    checkpoint = load_checkpoint(checkpoint_path)
    for name in RUN_SETTINGS:  # the run continues with the settings it started with
        setattr(args, name, checkpoint["settings"][name])
    return checkpoint


def load_data(args: argparse.Namespace, ctx: int) -> tuple[TokenStream, TokenStream, int, int]:
    """The two splits, the number of training windows, and the validation windows per evaluation."""
    train_stream = load_split(args.data_dir, "train", args.data_format)
    val_stream = load_split(args.data_dir, "val", args.data_format)
    n_windows = max(0, (len(train_stream) - 1) // ctx)
    if n_windows // args.batch_size == 0:
        raise UsageError(f"The training split ({len(train_stream):,} tokens) is too small for one batch of "
                         f"{args.batch_size} windows of {ctx} tokens: prepare more books or lower --batch-size.")
    n_val_windows = min(max(1, args.eval_tokens // ctx), (len(val_stream) - 1) // ctx)
    if n_val_windows < 1:
        raise UsageError(f"The validation split ({len(val_stream):,} tokens) is shorter than one window "
                         f"of {ctx} tokens.")
    return train_stream, val_stream, n_windows, n_val_windows


def set_up(args: argparse.Namespace) -> Run:
    """Join the process group (under torchrun), load the data, fix the schedule, build the model."""
    rank, world_size, device = setup_distributed(args.device)
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes "
                         f"({world_size}).")
    cfg = model_config(args)
    train_stream, val_stream, n_windows, n_val_windows = load_data(args, cfg["context_length"])
    total_steps = args.max_steps or args.num_epochs * (n_windows // args.batch_size)
    if args.warmup_steps is None:
        args.warmup_steps = max(1, total_steps // 20) if total_steps > 1 else 0
    lr_at_step(0, total_steps, args.lr, args.warmup_steps, args.initial_lr, args.min_lr)  # checks the schedule

    set_seed(args.seed)
    model = GPTModel(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ddp_model = model
    if world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(args, cfg, rank, world_size, device, model, ddp_model, optimizer, train_stream, val_stream,
               n_windows, n_val_windows, total_steps)


def restore(run: Run, checkpoint: dict | None) -> TrainState:
    """The state to start from: the checkpoint's (weights, optimizer, position, RNG), or a fresh one."""
    if checkpoint is None:
        torch.manual_seed(run.args.seed + run.rank)  # each process its own dropout draws
        return TrainState()
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    state = TrainState(*(checkpoint[k] for k in ("step", "epoch", "cursor", "tokens_seen")))
    rng = checkpoint["rng"]
    if len(rng) == run.world_size:
        set_rng_states(rng[run.rank])
    else:
        run.say(f"note: the checkpoint has RNG states of {len(rng)} process(es), this run has {run.world_size}; "
                "dropout draws differ from an uninterrupted run.")
        set_seed(run.args.seed + state.step + run.rank)
    run.say(f"Resuming at step {state.step} of {run.total_steps} (epoch {state.epoch}, window {state.cursor})")
    return state


def prepare_output(run: Run, state: TrainState, resumed: bool) -> None:
    """Create the output folder; keep the log lines of the steps the checkpoint holds, drop later ones."""
    run.args.output_dir.mkdir(parents=True, exist_ok=True)
    if not run.is_main:
        return
    for stale in run.args.output_dir.glob(f"{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink()  # left by a process killed while saving
    kept = read_log(run.log_path, up_to_step=state.step - 1) if resumed else []
    run.log_path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")


#####################################
# One step, evaluation, saving
#####################################

def train_step(run: Run, state: TrainState, sampler: WindowSampler) -> tuple[float, float, float]:
    """Take optimizer step number `state.step`; return (loss averaged over processes, lr, gradient norm)."""
    args = run.args
    lr = lr_at_step(state.step, run.total_steps, args.lr, args.warmup_steps, args.initial_lr, args.min_lr)
    apply_lr(run.optimizer, lr)
    inputs, targets = get_batch(run.train_stream, sampler.windows(state), run.ctx)
    run.optimizer.zero_grad(set_to_none=True)
    logits = run.ddp_model(inputs.to(run.device))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.to(run.device).flatten())
    loss.backward()
    clip = args.max_grad_norm if args.max_grad_norm > 0 and state.step >= args.warmup_steps else None
    grad_norm = clip_gradients(run.model, clip)
    run.optimizer.step()
    return all_reduce_mean(loss.detach(), run.world_size).item(), lr, grad_norm.item()


def evaluate_and_report(run: Run, state: TrainState, index: int, train_loss: float, log, bar) -> None:
    """Measure the validation loss after step `index`; rank 0 logs it, prints a sample and redraws the plot."""
    val_loss = evaluate(run.model, run.val_stream, run.n_val_windows, run.ctx, run.per_rank, run.rank,
                        run.world_size, run.device)
    if not run.is_main:
        return
    log.write(json.dumps({"step": index, "tokens_seen": state.tokens_seen, "val_loss": val_loss}) + "\n")
    log.flush()
    bar.write(f"step {index}: train loss {train_loss:.3f}, val loss {val_loss:.3f}")
    generate_and_print_sample(run.model, tiktoken.get_encoding("gpt2"), run.device, run.args.start_context,
                              print_fn=bar.write)
    plot_log(read_log(run.log_path), run.args.output_dir / "loss.png")


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Every process contributes its RNG states; rank 0 writes the checkpoint atomically."""
    rng = [get_rng_states()]
    if run.world_size > 1:
        rng = [None] * run.world_size
        dist.all_gather_object(rng, get_rng_states())
    if run.is_main:
        settings = {name: getattr(run.args, name) for name in RUN_SETTINGS}
        save_checkpoint_atomic({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": state.step,
            "epoch": state.epoch, "cursor": state.cursor, "tokens_seen": state.tokens_seen, "rng": rng,
            "settings": settings, "config": run.cfg,
        }, run.checkpoint_path)


def stop_requested(run: Run, stop: StopRequest) -> bool:
    """Whether Ctrl-C or SIGTERM reached any process: every process must stop after the same step."""
    flag = torch.tensor([float(stop.requested)], device=run.device)
    if run.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def finish(run: Run, state: TrainState) -> None:
    """After the last step: the final weights as safetensors and the final plot."""
    from safetensors.torch import save_file

    save_file(run.model.state_dict(), run.args.output_dir / "model.safetensors")
    plot_log(read_log(run.log_path), run.args.output_dir / "loss.png")
    run.say(f"Done: {state.step} steps, {state.tokens_seen:,} tokens. "
            f"Wrote {run.args.output_dir / 'model.safetensors'}")


#####################################
# The loop
#####################################

def train(run: Run, state: TrainState) -> int:
    """Train from `state` until the last step, a stop request or --stop-after; return the exit code."""
    from tqdm.auto import tqdm

    args, sampler, stop = run.args, WindowSampler(run), StopRequest()
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not run.is_main or args.no_progress,
               desc="Training")
    log = open(run.log_path, "a", encoding="utf-8") if run.is_main else None
    steps_this_run = 0
    run.model.train()
    try:
        while state.step < run.total_steps:
            index, started = state.step, time.perf_counter()
            loss, lr, grad_norm = train_step(run, state, sampler)
            sampler.advance(state)
            steps_this_run += 1
            if run.is_main:
                log.write(json.dumps({
                    "step": index, "epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_seen": state.tokens_seen,
                    "tokens_per_s": round(args.batch_size * run.ctx / (time.perf_counter() - started), 1)}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if index % args.eval_freq == 0 or state.step == run.total_steps:
                evaluate_and_report(run, state, index, loss, log, bar)

            interrupted = stop_requested(run, stop)
            paused = bool(args.stop_after) and steps_this_run >= args.stop_after
            if (interrupted or paused or (args.checkpoint_every and state.step % args.checkpoint_every == 0)
                    or state.step == run.total_steps):
                if log is not None:
                    log.flush()
                save_checkpoint(run, state)
            if interrupted:
                run.say(f"\nInterrupted: saved step {state.step} to {run.checkpoint_path}; "
                        "continue with --resume true.")
                return 130
            if paused and state.step < run.total_steps:
                run.say(f"Stopped after {steps_this_run} steps: saved step {state.step}; continue with --resume true.")
                return 0
    finally:
        bar.close()
        if log is not None:
            log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        checkpoint = load_resume_checkpoint(args)
        run = set_up(args)
    except ValueError as err:  # a UsageError, or a bad device or learning-rate schedule
        parser.error(str(err))
    state = restore(run, checkpoint)
    prepare_output(run, state, resumed=checkpoint is not None)
    exit_code = train(run, state)
    if run.is_main and state.step == run.total_steps:
        finish(run, state)
    if run.world_size > 1:
        dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
