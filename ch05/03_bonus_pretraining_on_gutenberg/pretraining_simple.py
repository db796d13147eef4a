"""Pretrain GPTModel on Project Gutenberg books.

    python pretraining_simple.py --data-dir gutenberg_preprocessed --debug true     # tiny model, quick check
    python pretraining_simple.py --data-dir gutenberg_preprocessed --max-steps 20000
    python pretraining_simple.py --data-dir gutenberg_preprocessed --resume true    # continue exactly
    python pretraining_simple.py --data_dir gutenberg_preprocessed --n_epochs 1 --batch_size 4   # the course's flags
    torchrun --nproc_per_node=4 pretraining_simple.py --data-dir gutenberg_preprocessed   # 4 GPUs (or CPU processes)

--data-dir is either the output folder of prepare_dataset.py (with metadata.json: the
fast path, token shards read straight from disk) or, as in the course, any folder of
plain .txt files, which are tokenized when the run starts; then the first 90% of each
file is training text and the rest validation text.

Writes to --output-dir: `checkpoint.pth` (model, optimizer, step, data position, RNG states
and settings; written atomically every --checkpoint-every steps, at the end and on Ctrl-C),
`log.jsonl` (per step: loss, learning rate, gradient norm, tokens/s; per evaluation:
validation loss), `loss.png` and, at the end, `model.safetensors` and `model_pg_final.pth`
(the course's file: the model's state dict). A lock file (`.run.lock`) refuses a second
run on the same folder while this one runs.

Data: the training split is one long stream of token ids, cut into windows of
context_length + 1 tokens. Each epoch visits the windows in an order shuffled by
(seed, epoch). One optimizer step takes the next --batch-size windows; under torchrun
each of the N processes ("ranks") reads its own 1/N of them and DDP averages the
gradients, so a run with N processes computes the same steps as one process with the
same --batch-size.

The course's functions (`read_text_file`, `create_dataloaders`, `convert_time`,
`print_eta` and its book-by-book `train_model_simple`) are here too, with its signatures.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ch05_utils import (
    FolderInUseError,
    RunLock,
    TrainProgress,
    calc_loss_batch,
    create_dataloader_v1,
    evaluate_model,
    generate_and_print_sample,
    get_device,
    get_rng_states,
    load_checkpoint,
    publish_atomic,
    save_checkpoint_atomic,
    set_rng_states,
    set_seed,
)
from lr_schedule import apply_lr, clip_gradients, lr_at_step
from prepare_dataset import EOT, DatasetError, load_shards, read_metadata, why_split_is_small
from previous_chapters import GPT_CONFIG_124M, GPTModel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

MODEL_PRESETS = {
    "124M": {**GPT_CONFIG_124M, "context_length": 1024},  # GPT-2's context, as the course's script uses
    "small": {**GPT_CONFIG_124M, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
    "tiny": {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
}
CHECKPOINT_NAME = "checkpoint.pth"
FINAL_MODEL_NAME = "model_pg_final.pth"  # the course's name for the final weights
TRAIN_RATIO = 0.90  # plain .txt folders: the share of each file that is training text, as in the course
# Settings that define the run. On --resume they come from the checkpoint, so that the
# continued run computes what the uninterrupted one would have; a flag that asks for
# another value is refused.
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


class UsageError(ValueError):
    """A bad setting or input found before training: reported as one `error:` line (exit code 2)."""


class RunFailed(RuntimeError):
    """Training cannot go on (a diverged loss, a failed save): one `error:` line, exit code 1."""


class Diverged(RunFailed):
    """The loss or the gradient is no longer a finite number."""


#####################################
# Data
#####################################

class TokenStream:
    """The token ids of one split as one long sequence over several arrays (memory-mapped
    shards are read only where a window falls). `names` say where each array comes from,
    for error messages; ids at or above `vocab_size` are refused when read."""

    def __init__(self, arrays: list[np.ndarray], names: list[str] | None = None, vocab_size: int | None = None):
        names = names if names is not None else [f"array {i}" for i in range(len(arrays))]
        kept = [(a, n) for a, n in zip(arrays, names, strict=True) if len(a)]
        self.arrays, self.names = [a for a, _ in kept], [n for _, n in kept]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.vocab_size = vocab_size

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
        if self.vocab_size is not None and out.max(initial=0) >= self.vocab_size:
            self._refuse_id(start, out)
        return out

    def _refuse_id(self, start: int, out: np.ndarray) -> None:
        position = start + int(np.argmax(out >= self.vocab_size))
        i = int(np.searchsorted(self.offsets, position, side="right")) - 1
        raise DatasetError(f"{self.names[i]} holds token id {out[position - start]} (at token "
                           f"{position - self.offsets[i]:,}), beyond the vocabulary of {self.vocab_size:,}: it "
                           "is damaged or from another tokenizer. Run prepare_dataset.py again.")


def read_text_file(file_path: str | Path) -> str:
    """The text of a UTF-8 file (the course's helper); a file in another encoding is named
    in a one-line error."""
    try:
        with open(file_path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{file_path} is not UTF-8 text (byte {err.start}: {err.reason}). Convert it, or run "
                           "prepare_dataset.py on its folder, which also reads other encodings.") from None


def split_text(text: str, train_ratio: float) -> tuple[str, str]:
    """The first `train_ratio` of the characters for training, the rest for validation (the course's split)."""
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def text_files(data_dir: Path) -> list[Path]:
    """The .txt files under `data_dir` (searched recursively, as the course's script does), sorted."""
    return sorted(p for p in data_dir.rglob("*.txt") if p.is_file())


def load_text_folder(data_dir: Path, train_ratio: float = TRAIN_RATIO,
                     progress: bool = True) -> tuple[TokenStream, TokenStream]:
    """Both splits of a folder of plain .txt files, tokenized now: of each file (followed by
    `<|endoftext|>`, as in the course), the first `train_ratio` trains and the rest validates."""
    from tqdm.auto import tqdm

    tokenizer = tiktoken.get_encoding("gpt2")
    paths = text_files(data_dir)
    parts = {"train": [], "val": []}
    for path in tqdm(paths, desc="Tokenizing", unit="file", disable=not progress):
        for split, text in zip(parts, split_text(read_text_file(path) + f" {EOT} ", train_ratio), strict=True):
            parts[split].append(tokenizer.encode_to_numpy(text, allowed_special={EOT}).astype(np.uint16))
    return tuple(TokenStream(parts[split], [f"{p} ({split} part)" for p in paths], tokenizer.n_vocab)
                 for split in ("train", "val"))


def load_split(data_dir: Path, split: str, data_format: str) -> TokenStream:
    """The split's tokens from prepare_dataset.py's .bin shards, or by tokenizing its text files."""
    metadata = read_metadata(data_dir)
    vocab_size = tiktoken.get_encoding(metadata["tokenizer"]).n_vocab
    if data_format == "shards":
        names = [str(data_dir / s["file"]) for s in metadata["splits"][split]["shards"]]
        return TokenStream(load_shards(data_dir, split), names, vocab_size)
    tokenizer = tiktoken.get_encoding(metadata["tokenizer"])
    files = [data_dir / f["file"] for f in metadata["splits"][split]["text_files"]]
    arrays = [tokenizer.encode_to_numpy(read_text_file(path), allowed_special={EOT}).astype(np.uint16)
              for path in files]
    return TokenStream(arrays, [str(path) for path in files], vocab_size)


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

def die_with_parent() -> None:
    """Under torchrun, have Linux kill this process when its parent (the torchrun agent)
    dies, so no rank trains on, orphaned, after its launcher was killed (`kill -9`).
    (torchrun itself stops its ranks on Ctrl-C and SIGTERM; other systems: no-op.)"""
    if sys.platform != "linux":
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


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
    """The entries of log.jsonl, only those up to `up_to_step` if given.

    A line that is not a complete JSON record (the last line of a process killed while
    writing it) is skipped: the log is a record of the run, never a reason to stop it.
    """
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
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
    publish_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


#####################################
# Command line
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
    """The flags; the course's underscore spellings (`--data_dir`, `--n_epochs`, ...) are aliases."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-dir", "--data_dir", type=Path, default=Path("gutenberg/data"),
        help="Output folder of prepare_dataset.py (with metadata.json), or a folder of plain .txt files.")
    add("--data-format", choices=("auto", "shards", "text", "plain"), default="auto",
        help="shards: prepare_dataset.py's uint16 shards; text: its combined text files, tokenized at start; "
             "plain: every .txt file under --data-dir, tokenized at start, each split 90/10; "
             "auto: shards if --data-dir has metadata.json, else plain.")
    add("--output-dir", "--output_dir", type=Path, default=Path("model_checkpoints"))
    add("--model", choices=sorted(MODEL_PRESETS), default="124M", help="Model shape.")
    add("--debug", type=str2bool, nargs="?", const=True, default=False,
        help="Use the tiny model (context 32, 2 layers), for quick checks.")
    add("--context-length", type=int, default=None, help="Override the preset's context length.")
    add("--drop-rate", type=float, default=None, help="Override the preset's dropout rate.")
    add("--batch-size", "--batch_size", type=int, default=4,
        help="Windows per optimizer step, over all processes together.")
    add("--num-epochs", "--n_epochs", type=int, default=1,
        help="Passes over the training split (unless --max-steps is set).")
    add("--max-steps", type=int, default=None, help="Length of the run in optimizer steps.")
    add("--lr", type=float, default=5e-4, help="Peak learning rate (AdamW).")
    add("--initial-lr", type=float, default=1e-5, help="Learning rate at the start of warm-up.")
    add("--min-lr", type=float, default=5e-5, help="Learning rate at the end of cosine decay.")
    add("--warmup-steps", type=int, default=None, help="Linear warm-up steps (default: 5%% of the run).")
    add("--max-grad-norm", type=float, default=1.0, help="Clip the global gradient norm after warm-up (0: off).")
    add("--weight-decay", type=float, default=0.1)
    add("--shuffle", type=str2bool, nargs="?", const=True, default=True, help="Shuffle the windows each epoch.")
    add("--seed", type=int, default=123)
    add("--eval-freq", "--eval_freq", type=int, default=100, help="Evaluate every N steps.")
    add("--eval-tokens", type=int, default=65_536, help="Validation tokens per evaluation.")
    add("--print-sample-iter", "--print_sample_iter", type=int, default=1000,
        help="Print a greedy sample of --start-context every N steps (0: never).")
    add("--start-context", default="Every effort moves you", help="Prompt of the printed samples.")
    add("--checkpoint-every", "--save_ckpt_freq", type=int, default=500,
        help="Save a checkpoint every N steps (0: only at the end).")
    add("--stop-after", type=int, default=None,
        help="Save and exit after N steps of this invocation, to continue later with --resume (time-limited jobs).")
    add("--resume", type=str2bool, nargs="?", const=True, default=False,
        help="Continue from --output-dir/checkpoint.pth with the checkpoint's settings.")
    add("--overwrite", type=str2bool, nargs="?", const=True, default=False,
        help="Start over even if --output-dir holds a checkpoint.")
    add("--device", default="auto", help="auto, cpu, cuda or mps.")
    add("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def explicit_flags(argv: list[str] | None) -> set[str]:
    """The settings (argparse dests) given on the command line, as opposed to left at their default."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # a flag that is not given leaves no attribute
    return set(vars(probe.parse_args(sys.argv[1:] if argv is None else argv)))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse out-of-range, NaN and infinite numbers before anything else happens."""
    for name in ("batch_size", "num_epochs", "eval_freq", "eval_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"{_flag(name)} must be >= 1, got {getattr(args, name)}.")
    for name in ("max_steps", "stop_after", "context_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"{_flag(name)} must be >= 1, got {getattr(args, name)}.")
    for name in ("checkpoint_every", "print_sample_iter", "warmup_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"{_flag(name)} must be >= 0, got {getattr(args, name)}.")
    for name in ("lr", "initial_lr", "min_lr", "max_grad_norm", "weight_decay", "drop_rate"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            parser.error(f"{_flag(name)} must be a finite number >= 0, got {value}.")
    if args.lr == 0:
        parser.error("--lr must be > 0: with a learning rate of 0 the model never changes.")
    if args.drop_rate is not None and args.drop_rate >= 1:
        parser.error(f"--drop-rate must be below 1 (1 would drop every activation), got {args.drop_rate}.")


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The data folder must hold data; the output folder must be a writable folder (checked
    now, not after an epoch of training)."""
    data_dir, out = args.data_dir, args.output_dir
    has_metadata = (data_dir / "metadata.json").is_file()
    if not data_dir.is_dir() or not (has_metadata or text_files(data_dir)):
        what = "holds neither prepare_dataset.py's metadata.json nor .txt files" if data_dir.is_dir() \
            else "is not a folder"
        parser.error(f"--data-dir {data_dir} {what}: run prepare_dataset.py first (see README.md), "
                     "or point it at a folder of text files.")
    if args.data_format == "auto":
        args.data_format = "shards" if has_metadata else "plain"
    elif args.data_format in ("shards", "text") and not has_metadata:
        parser.error(f"--data-format {args.data_format} needs the metadata.json of prepare_dataset.py in "
                     f"--data-dir {data_dir}; use --data-format plain for a folder of .txt files.")
    if out.exists() and not out.is_dir():
        parser.error(f"--output-dir {out} is a file, not a folder. Choose another --output-dir.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        parser.error(f"--output-dir {out} is not writable ({err.strerror or err}). Choose another --output-dir.")


def model_config(args: argparse.Namespace) -> dict:
    cfg = dict(MODEL_PRESETS["tiny" if args.debug else args.model])
    if args.context_length is not None:
        cfg["context_length"] = args.context_length
    if args.drop_rate is not None:
        cfg["drop_rate"] = args.drop_rate
    return cfg


#####################################
# The run and where it stands
#####################################

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

    @property
    def data(self) -> dict:
        """What identifies the training data, kept in the checkpoint to check on --resume."""
        return {"train_tokens": len(self.train_stream), "val_tokens": len(self.val_stream)}

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

def load_resume_checkpoint(args: argparse.Namespace, explicit: set[str]) -> dict | None:
    """The checkpoint to continue from (its settings replace the arguments'), or None to start afresh.

    A setting given on the command line that differs from the checkpoint's is refused by
    name: the continued run must compute what the uninterrupted one would have.
    """
    checkpoint_path = args.output_dir / CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        return None
    if not args.resume:
        if args.overwrite:
            return None
        raise UsageError(f"{checkpoint_path} exists: pass --resume true to continue it, or --overwrite true "
                         "to start over, or choose another --output-dir.")
    checkpoint = load_checkpoint(checkpoint_path)  # a damaged file is a one-line ValueError
    settings = checkpoint.get("settings") if isinstance(checkpoint, dict) else None
    if not isinstance(settings, dict) or not set(RUN_SETTINGS) <= set(settings) or "rng" not in checkpoint:
        raise UsageError(f"{checkpoint_path} was not written by pretraining_simple.py (it lacks the run's settings): "
                         "move it away, or pass --overwrite true to start over.")
    changed = [f"{_flag(n)} {getattr(args, n)} (the checkpoint's run has {settings[n]})"
               for n in RUN_SETTINGS if n in explicit and getattr(args, n) != settings[n]]
    if changed:
        raise UsageError(f"--resume continues the run with the settings it started with, but {', '.join(changed)}. "
                         "Drop the flag(s), or start a new run (--overwrite true or another --output-dir).")
    for name in RUN_SETTINGS:
        setattr(args, name, settings[name])
    return checkpoint


def load_data(args: argparse.Namespace, ctx: int) -> tuple[TokenStream, TokenStream, int, int]:
    """The two splits, the number of training windows, and the validation windows per evaluation."""
    if args.data_format == "plain":
        train_stream, val_stream = load_text_folder(args.data_dir, progress=not args.no_progress)
        where = f"{len(text_files(args.data_dir))} .txt file(s) in {args.data_dir}, {TRAIN_RATIO:.0%} of each"
    else:
        train_stream = load_split(args.data_dir, "train", args.data_format)
        val_stream = load_split(args.data_dir, "val", args.data_format)
        where = f"prepared in {args.data_dir}"
    n_windows = max(0, (len(train_stream) - 1) // ctx)
    if n_windows // args.batch_size == 0:
        raise UsageError(f"The training split ({len(train_stream):,} tokens, {where}) is too small for one batch of "
                         f"{args.batch_size} windows of {ctx} tokens: {_too_small_advice(args, 'train')}.")
    n_val_windows = min(max(1, args.eval_tokens // ctx), (len(val_stream) - 1) // ctx)
    if n_val_windows < 1:
        raise UsageError(f"The validation split ({len(val_stream):,} tokens, {where}) is shorter than one window "
                         f"of {ctx} tokens: {_too_small_advice(args, 'val')}.")
    return train_stream, val_stream, n_windows, n_val_windows


def _too_small_advice(args: argparse.Namespace, split: str) -> str:
    """What to change when a split is too small: prepare_dataset.py's own reasons first, if it made the data."""
    advice = "add text, or lower --batch-size or --context-length (--debug true uses a context of 32)"
    if args.data_format != "plain":
        reasons = why_split_is_small(read_metadata(args.data_dir), split)
        advice = f"{reasons}; or {advice}" if reasons else advice
    return advice


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
        # The only buffers are the constant causal masks: no need to re-send them every step.
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            broadcast_buffers=False)
    return Run(args, cfg, rank, world_size, device, model, ddp_model, optimizer, train_stream, val_stream,
               n_windows, n_val_windows, total_steps)


def restore(run: Run, checkpoint: dict | None) -> TrainState:
    """The state to start from: the checkpoint's (weights, optimizer, position, RNG), or a fresh one."""
    if checkpoint is None:
        torch.manual_seed(run.args.seed + run.rank)  # each process its own dropout draws
        return TrainState()
    if checkpoint.get("data", run.data) != run.data:
        raise UsageError(f"--data-dir {run.args.data_dir} holds other data than the checkpoint's run was trained on "
                         f"({run.data} now, {checkpoint['data']} then): resume with that data, or start a new run.")
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
    """Keep the log lines of the steps the checkpoint holds and drop later ones (rank 0)."""
    if not run.is_main:
        return
    kept = read_log(run.log_path, up_to_step=state.step - 1) if resumed else []
    publish_atomic(run.log_path, lambda tmp: tmp.write_text("".join(json.dumps(e) + "\n" for e in kept),
                                                            encoding="utf-8"))


#####################################
# One step, evaluation, saving
#####################################

def train_step(run: Run, state: TrainState, sampler: WindowSampler) -> tuple[float, float, float]:
    """Take optimizer step number `state.step`; return (loss averaged over processes, lr, gradient norm).

    A loss or gradient that is not finite stops the run before the optimizer applies it,
    so the weights (and the last checkpoint) stay those of the last good step.
    """
    args = run.args
    lr = lr_at_step(state.step, run.total_steps, args.lr, args.warmup_steps, args.initial_lr, args.min_lr)
    apply_lr(run.optimizer, lr)
    inputs, targets = get_batch(run.train_stream, sampler.windows(state), run.ctx)
    run.optimizer.zero_grad(set_to_none=True)
    logits = run.ddp_model(inputs.to(run.device))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.to(run.device).flatten())
    loss.backward()
    clip = args.max_grad_norm if args.max_grad_norm > 0 and state.step >= args.warmup_steps else None
    grad_norm = clip_gradients(run.model, clip).item()
    mean_loss = all_reduce_mean(loss.detach(), run.world_size).item()
    if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
        raise Diverged(f"training diverged at step {state.step}: loss {mean_loss}, gradient norm {grad_norm} "
                        f"(learning rate {lr:.3g}). The step was not applied and nothing was saved after it")
    run.optimizer.step()
    return mean_loss, lr, grad_norm


def log_step(run: Run, state: TrainState, index: int, loss: float, lr: float, grad_norm: float,
             seconds: float, log, bar) -> None:
    """Rank 0 writes step `index`'s line to log.jsonl and updates the progress bar."""
    if not run.is_main:
        return
    log.write(json.dumps({"step": index, "epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_seen": state.tokens_seen,
                          "tokens_per_s": round(run.args.batch_size * run.ctx / seconds, 1)}) + "\n")
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")


def evaluate_and_report(run: Run, state: TrainState, index: int, epoch: int, train_loss: float, log, bar) -> None:
    """Measure the validation loss after step `index`; rank 0 logs and prints it and redraws the plot."""
    val_loss = evaluate(run.model, run.val_stream, run.n_val_windows, run.ctx, run.per_rank, run.rank,
                        run.world_size, run.device)
    if not run.is_main:
        return
    log.write(json.dumps({"step": index, "tokens_seen": state.tokens_seen, "val_loss": val_loss}) + "\n")
    log.flush()
    bar.write(f"Ep {epoch + 1} (Step {index}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
    plot_log(read_log(run.log_path), run.args.output_dir / "loss.png")


def save_checkpoint(run: Run, state: TrainState) -> None:
    """Every process contributes its RNG states; rank 0 writes the checkpoint atomically."""
    rng = [get_rng_states()]
    if run.world_size > 1:
        rng = [None] * run.world_size
        dist.all_gather_object(rng, get_rng_states())
    if not run.is_main:
        return
    settings = {name: getattr(run.args, name) for name in RUN_SETTINGS}
    try:
        save_checkpoint_atomic({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": state.step,
            "epoch": state.epoch, "cursor": state.cursor, "tokens_seen": state.tokens_seen, "rng": rng,
            "settings": settings, "config": run.cfg, "data": run.data,
        }, run.checkpoint_path)
    except OSError as err:
        raise RunFailed(f"saving {run.checkpoint_path} failed: {err.strerror or err}") from None


def stop_requested(run: Run, stop: StopRequest) -> bool:
    """Whether Ctrl-C or SIGTERM reached any process: every process must stop after the same step."""
    flag = torch.tensor([float(stop.requested)], device=run.device)
    if run.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def save_or_stop(run: Run, state: TrainState, stop: StopRequest, steps_this_run: int, log) -> int | None:
    """Save a checkpoint when one is due or the run stops here; return the exit code to stop with, or None."""
    args = run.args
    interrupted = stop_requested(run, stop)
    paused = bool(args.stop_after) and steps_this_run >= args.stop_after
    due = bool(args.checkpoint_every) and state.step % args.checkpoint_every == 0
    if interrupted or paused or due or state.step == run.total_steps:
        if log is not None:
            log.flush()
        save_checkpoint(run, state)
    if interrupted:
        run.say(f"\nInterrupted: saved step {state.step} to {run.checkpoint_path}; continue with --resume true.")
        return 130
    if paused and state.step < run.total_steps:
        run.say(f"Stopped after {steps_this_run} steps: saved step {state.step}; continue with --resume true.")
        return 0
    return None


def finish(run: Run, state: TrainState) -> None:
    """After the last step: the final weights (as safetensors, and as the course's state-dict
    file), the final plot, and the course's last line."""
    from safetensors.torch import save_file

    out = run.args.output_dir
    state_dict = run.model.state_dict()
    try:
        publish_atomic(out / "model.safetensors", lambda tmp: save_file(state_dict, tmp))
        save_checkpoint_atomic(state_dict, out / FINAL_MODEL_NAME)
        plot_log(read_log(run.log_path), out / "loss.png")
    except OSError as err:
        raise RunFailed(f"saving the final model in {out} failed: {err.strerror or err}; {run.checkpoint_path} "
                        "holds the last step") from None
    run.say(f"Done: {state.step} steps, {state.tokens_seen:,} tokens. Wrote {out / 'model.safetensors'} "
            f"and {out / FINAL_MODEL_NAME}")
    memory = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else 0
    run.say(f"Maximum GPU memory allocated: {memory / 1e9:.2f} GB")


#####################################
# The loop
#####################################

def train(run: Run, state: TrainState) -> int:
    """Train from `state` until the last step, a stop request or --stop-after; return the exit code."""
    from tqdm.auto import tqdm

    args, sampler, stop = run.args, WindowSampler(run), StopRequest()
    tokenizer = tiktoken.get_encoding("gpt2")
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not run.is_main or args.no_progress,
               desc="Training")
    log = open(run.log_path, "a", encoding="utf-8") if run.is_main else None
    steps_this_run, saved_step = 0, state.step or None
    run.model.train()
    try:
        while state.step < run.total_steps:
            index, epoch, started = state.step, state.epoch, time.perf_counter()
            loss, lr, grad_norm = train_step(run, state, sampler)
            sampler.advance(state)
            steps_this_run += 1
            log_step(run, state, index, loss, lr, grad_norm, time.perf_counter() - started, log, bar)
            if index % args.eval_freq == 0 or state.step == run.total_steps:
                evaluate_and_report(run, state, index, epoch, loss, log, bar)
            if args.print_sample_iter and index % args.print_sample_iter == 0 and run.is_main:
                generate_and_print_sample(run.model, tokenizer, run.device, args.start_context, print_fn=bar.write)
            exit_code = save_or_stop(run, state, stop, steps_this_run, log)
            if exit_code is not None:
                return exit_code
            if args.checkpoint_every and state.step % args.checkpoint_every == 0:
                saved_step = state.step
    except Diverged as err:
        kept = f"{run.checkpoint_path} holds step {saved_step}" if saved_step else "no checkpoint of this run exists"
        raise Diverged(f"{err}; {kept}. Start again with a lower --lr (--overwrite true).") from None
    finally:
        bar.close()
        if log is not None:
            log.close()
    return 0


#####################################
# The course's book-by-book training loop
#####################################

def create_dataloaders(text_data: str, train_ratio: float, batch_size: int, max_length: int, stride: int,
                       num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """The course's loaders for one book: the first `train_ratio` of the text for training
    (shuffled, an incomplete last batch dropped), the rest for validation (in order, all of it)."""
    train_text, val_text = split_text(text_data, train_ratio)
    train_loader = create_dataloader_v1(train_text, batch_size=batch_size, max_length=max_length, stride=stride,
                                        drop_last=True, shuffle=True, num_workers=num_workers)
    val_loader = create_dataloader_v1(val_text, batch_size=batch_size, max_length=max_length, stride=stride,
                                      drop_last=False, shuffle=False, num_workers=num_workers)
    return train_loader, val_loader


def convert_time(seconds: float) -> tuple[int, int, int]:
    """Seconds as whole (hours, minutes, seconds)."""
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return int(hours), int(minutes), int(seconds)


def print_eta(start_time: float, book_start_time: float, index: int, total_files: int) -> None:
    """Print how long book `index` (counted from 1) of `total_files` took, the time since
    `start_time`, and the time the remaining books will take at the average pace so far."""
    now = time.time()
    elapsed = now - start_time
    remaining = elapsed / index * (total_files - index)
    for label, seconds in (("Book processed", now - book_start_time), ("Total time elapsed", elapsed),
                           ("ETA for remaining books:", remaining)):
        hours, minutes, secs = convert_time(seconds)
        print(f"{label} {hours}h {minutes}m {secs}s")


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    save_checkpoint_atomic(model.state_dict(), path)
    print(f"Saved {path}")


def _train_on_book(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                   loaders: tuple[DataLoader, DataLoader], epoch: int, progress: TrainProgress, eval_freq: int,
                   eval_iter: int, print_sample_iter: int, start_context: str, tokenizer) -> None:
    """One pass over one book's training batches, with the course's evaluations and samples."""
    train_loader, val_loader = loaders
    model.train()
    for input_batch, target_batch in train_loader:
        optimizer.zero_grad()
        loss = calc_loss_batch(input_batch, target_batch, model, device)
        loss.backward()
        optimizer.step()
        progress.tokens_seen += input_batch.numel()
        progress.global_step += 1
        if progress.global_step % eval_freq == 0:
            train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
            progress.train_losses.append(train_loss)
            progress.val_losses.append(val_loss)
            progress.track_tokens_seen.append(progress.tokens_seen)
            print(f"Ep {epoch + 1} (Step {progress.global_step}): "
                  f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        if progress.global_step % print_sample_iter == 0:
            generate_and_print_sample(model, tokenizer, device, start_context)


def train_model_simple(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                       n_epochs: int, eval_freq: int, eval_iter: int, print_sample_iter: int, start_context: str,
                       output_dir: str | Path, save_ckpt_freq: int, tokenizer, batch_size: int = 1024,
                       train_ratio: float = 0.90, *, files: list | None = None) -> tuple[list, list, list]:
    """The course's training loop: book by book, each tokenized when its turn comes and
    split into its own training and validation loaders (`create_dataloaders`).

    Returns (train_losses, val_losses, track_tokens_seen). As in the course, the weights
    are saved to `output_dir/model_pg_<step>.pth` after each book whose last step is not a
    multiple of `save_ckpt_freq` (the course's condition, kept), and on Ctrl-C to
    `model_pg_<step>_interrupted.pth`. The books are `files`; the course's script instead
    sets a module-level `all_files`, which is used when `files` is not given.
    """
    files = files if files is not None else globals().get("all_files")
    if files is None:
        raise ValueError("train_model_simple needs the books: pass files=[...] (paths of .txt files).")
    output_dir, context_length = Path(output_dir), model.pos_emb.weight.shape[0]
    progress, start_time = TrainProgress(), time.time()
    try:
        for epoch in range(n_epochs):
            for index, file_path in enumerate(files, 1):
                book_start_time = time.time()
                text_data = read_text_file(file_path) + f" {EOT} "
                print(f"Tokenizing file {index} of {len(files)}: {file_path}")
                loaders = create_dataloaders(text_data, train_ratio=train_ratio, batch_size=batch_size,
                                             max_length=context_length, stride=context_length, num_workers=0)
                print("Training ...")
                _train_on_book(model, optimizer, device, loaders, epoch, progress, eval_freq, eval_iter,
                               print_sample_iter, start_context, tokenizer)
                if progress.global_step % save_ckpt_freq:
                    _save_weights(model, output_dir / f"model_pg_{progress.global_step}.pth")
                print_eta(start_time, book_start_time, index, len(files))
    except KeyboardInterrupt:
        _save_weights(model, output_dir / f"model_pg_{progress.global_step}_interrupted.pth")
    return progress.train_losses, progress.val_losses, progress.track_tokens_seen


#####################################
# Command line
#####################################

def run_training(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set[str]) -> int:
    """Set up (or resume) the run and train it; bad inputs end in `parser.error`, failures in one `error:` line."""
    try:
        checkpoint = load_resume_checkpoint(args, explicit)
        run = set_up(args)
        state = restore(run, checkpoint)
    except (ValueError, FileNotFoundError) as err:  # bad settings, damaged data or checkpoint, a bad device
        parser.error(str(err))
    prepare_output(run, state, resumed=checkpoint is not None)
    try:
        exit_code = train(run, state)
        if run.is_main and state.step == run.total_steps:
            finish(run, state)
    except (RunFailed, DatasetError) as err:
        rank = f"[rank {run.rank}] " if run.world_size > 1 else ""
        print(f"{rank}error: {err}", file=sys.stderr)
        exit_code = 2 if isinstance(err, DatasetError) else 1
    if run.world_size > 1:
        dist.destroy_process_group()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    check_paths(parser, args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        die_with_parent()
    lock = RunLock(args.output_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    try:
        with lock:  # rank 0 holds it for the whole run
            return run_training(parser, args, explicit_flags(argv))
    except FolderInUseError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
