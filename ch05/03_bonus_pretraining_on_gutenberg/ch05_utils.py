"""The functions that ch05.ipynb builds, in one module for the scripts and other folders.

The notebook writes each of these step by step; `gpt_train.py`, `gpt_generate.py` and
the bonus folders import them from here. Like `previous_chapters.py`, this file is the
canonical copy that `scripts/sync_shared_code.py` copies into other folders.
"""

import hashlib
import os
import random
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from previous_chapters import GPTModel, create_dataloader_v1, get_tokenizer

THE_VERDICT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
)
THE_VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
DATA_DIR_ENV = "CH05_DATA_DIR"  # folder with local copies of the chapter's data files
CACHE_DIR_ENV = "CH05_CACHE_DIR"  # where downloads are kept (default ~/.cache/llm-from-scratch-ch05)


#####################################
# Text <-> token ids
#####################################

def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Encode `text` into a (1, n_tokens) tensor: a batch of one."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Decode a (1, n_tokens) or (n_tokens,) tensor of token ids back into text."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())


#####################################
# Data: reading, downloading, splitting
#####################################

def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with errors that say what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Text file not found: {path}. Check the path, or leave it out to use the-verdict.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8 text (byte {err.start}: {err.reason}). "
            "Convert it first, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`."
        ) from None
    if not text.strip():
        raise ValueError(f"{path} is empty: training needs some text.")
    return text


def cache_dir() -> Path:
    """Folder for downloaded files; override with the CH05_CACHE_DIR environment variable."""
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "llm-from-scratch-ch05"))


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_verified(url: str, dest: Path, sha256: str) -> Path:
    """Download `url` to `dest` unless a file with the right SHA-256 is already there.

    The download goes to a temporary file that is renamed only after its checksum
    matches, so an interrupted or corrupted download never looks complete.
    """
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            f.write(response.read())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConnectionError(
            f"Could not download {url} ({err}). Without internet, pass a local copy "
            f"(--text-file PATH) or set {DATA_DIR_ENV} to a folder that holds {dest.name}."
        ) from None
    actual = sha256_of(tmp)
    if actual != sha256:
        tmp.unlink()
        raise ValueError(f"Checksum mismatch for {url}: expected {sha256}, got {actual}. The file was removed.")
    os.replace(tmp, dest)
    return dest


def the_verdict_path() -> Path:
    """Path to the-verdict.txt: from $CH05_DATA_DIR if set, else downloaded once into the cache."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = Path(data_dir) / "the-verdict.txt"
        if not local.is_file():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={data_dir} is set but holds no the-verdict.txt.")
        return local
    return fetch_verified(THE_VERDICT_URL, cache_dir() / "the-verdict.txt", THE_VERDICT_SHA256)


def create_train_val_loaders(text: str, cfg: dict, batch_size: int, train_ratio: float = 0.9,
                             seed: int = 123) -> tuple[DataLoader, DataLoader]:
    """Split `text` at `train_ratio` and build the chapter's train and validation loaders.

    Both splits must hold at least one full window of `context_length` + 1 tokens
    (inputs plus the shifted target), otherwise a loader would silently be empty.
    The training loader shuffles with its own seeded generator, which makes the
    batch order reproducible and lets a resumed run continue the same order.
    """
    split_idx = int(train_ratio * len(text))
    train_text, val_text = text[:split_idx], text[split_idx:]
    ctx = cfg["context_length"]
    tokenizer = get_tokenizer()
    for name, part, min_windows in (("training", train_text, batch_size), ("validation", val_text, 1)):
        n_windows = len(range(0, len(tokenizer.encode(part, allowed_special={"<|endoftext|>"})) - ctx, ctx))
        if n_windows < min_windows:
            raise ValueError(
                f"The {name} split ({len(part):,} characters) is too short for one batch of "
                f"{min_windows} window(s) of context_length={ctx} tokens (+1 for the target). "
                "Use a longer text, a smaller --context-length, or a smaller --batch-size."
            )
    train_loader = create_dataloader_v1(train_text, batch_size=batch_size, max_length=ctx, stride=ctx,
                                        shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))
    val_loader = create_dataloader_v1(val_text, batch_size=batch_size, max_length=ctx, stride=ctx,
                                      shuffle=False, drop_last=False)
    return train_loader, val_loader


#####################################
# Loss
#####################################

def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: torch.nn.Module,
                    device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions on one batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: DataLoader, model: torch.nn.Module, device: torch.device,
                     num_batches: int | None = None) -> float:
    """Average `calc_loss_batch` over the first `num_batches` batches (all by default)."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                   device: torch.device, eval_iter: int) -> tuple[float, float]:
    """Training and validation loss over `eval_iter` batches each, in eval mode (no dropout)."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


#####################################
# Generation
#####################################

def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend each row of `idx` (batch, n_tokens) by up to `max_new_tokens` tokens.

    temperature == 0 picks the most likely token (greedy); temperature > 0 samples from
    softmax(logits / temperature), sharper below 1 and flatter above. `top_k` keeps only
    the k most likely tokens before sampling. When `eos_id` is given, a row that has
    produced it keeps producing `eos_id` (padding) and generation stops once every row
    has. Pass a seeded `generator` for reproducible sampling.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]
        if top_k is not None:
            kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, -torch.inf)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= idx_next.squeeze(1) == eos_id
        idx = torch.cat((idx, idx_next), dim=1)
        if eos_id is not None and finished.all():
            break
    return idx


def generate_and_print_sample(model: GPTModel, tokenizer, device: torch.device, start_context: str,
                              max_new_tokens: int = 50, print_fn=print) -> str:
    """Greedily continue `start_context` and print the text on one line (used during training)."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens=max_new_tokens, context_size=context_size)
    text = token_ids_to_text(token_ids, tokenizer)
    print_fn(text.replace("\n", " "))
    model.train()
    return text


#####################################
# Training
#####################################

@dataclass
class TrainProgress:
    """Where a training run stands: enough to resume it exactly.

    `batches_done` counts the batches of the current epoch already trained on; the
    two loader RNG states are the training loader's shuffle generator at the start of
    this epoch (to recreate its batch order) and now (for what comes next).
    """
    epoch: int = 0
    batches_done: int = 0
    global_step: int = -1
    tokens_seen: int = 0
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    track_tokens_seen: list = field(default_factory=list)
    loader_rng_epoch_start: torch.Tensor | None = None
    loader_rng_now: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def train_model_simple(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                       optimizer: torch.optim.Optimizer, device: torch.device, num_epochs: int,
                       eval_freq: int, eval_iter: int, start_context: str, tokenizer,
                       progress: TrainProgress | None = None, max_steps: int | None = None,
                       on_step=None, print_fn=print, progress_bar: bool = False):
    """The chapter's training loop: one optimizer step per batch, evaluation every
    `eval_freq` steps, a greedy sample after each epoch.

    Returns (train_losses, val_losses, track_tokens_seen). The optional arguments make
    the loop resumable without changing what it computes: `progress` says where to
    start (it is updated in place), `on_step(progress)` is called after every step
    (gpt_train.py saves checkpoints there), and `max_steps` stops early.
    """
    progress = progress or TrainProgress()
    generator = getattr(train_loader, "generator", None)
    while progress.epoch < num_epochs:
        if generator is not None:
            if progress.batches_done == 0:
                if progress.loader_rng_now is not None:  # a no-op unless resuming at an epoch boundary
                    generator.set_state(progress.loader_rng_now)
                progress.loader_rng_epoch_start = generator.get_state()
            else:  # resuming mid-epoch: replay this epoch's shuffle order
                generator.set_state(progress.loader_rng_epoch_start)
        model.train()
        loader_iter = batches = iter(train_loader)
        for _ in range(progress.batches_done):
            next(batches)
        if generator is not None and progress.loader_rng_now is not None and progress.batches_done:
            generator.set_state(progress.loader_rng_now)
        if progress_bar:
            from tqdm.auto import tqdm
            batches = tqdm(batches, total=len(train_loader), initial=progress.batches_done,
                           desc=f"Epoch {progress.epoch + 1}/{num_epochs}", leave=False)
        for input_batch, target_batch in batches:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            progress.tokens_seen += input_batch.numel()
            progress.global_step += 1
            progress.batches_done += 1

            if progress.global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                progress.train_losses.append(train_loss)
                progress.val_losses.append(val_loss)
                progress.track_tokens_seen.append(progress.tokens_seen)
                print_fn(f"Ep {progress.epoch + 1} (Step {progress.global_step:06d}): "
                         f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            if progress.batches_done == len(train_loader):  # epoch done: move on before saving
                # Finish the iterator as a plain `for` loop would: its last call draws from
                # the shuffling generator, and the next epoch's order depends on that.
                next(loader_iter, None)
                generate_and_print_sample(model, tokenizer, device, start_context, print_fn=print_fn)
                progress.epoch += 1
                progress.batches_done = 0
            if generator is not None:
                progress.loader_rng_now = generator.get_state()
            if on_step is not None:
                on_step(progress)
            if max_steps is not None and progress.global_step + 1 >= max_steps:
                return progress.train_losses, progress.val_losses, progress.track_tokens_seen
            if progress.batches_done == 0:
                break  # the epoch is over
    return progress.train_losses, progress.val_losses, progress.track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path: str | Path | None = None):
    """Training and validation loss against epochs (bottom axis) and tokens seen (top axis)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same y-axis, second x-axis for tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: only aligns the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


#####################################
# Devices, RNG and checkpoints
#####################################

def get_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU here. Use --device cpu.")
        return torch.device("cuda")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps was asked for, but Apple's MPS backend is not available here.")
        return torch.device("mps")
    raise ValueError(f"Unknown device {name!r}: use one of auto, cpu, cuda, mps.")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) at once."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_states() -> dict:
    """Every global RNG state a training run draws from, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint_atomic(obj: dict, path: str | Path) -> None:
    """`torch.save` to a temporary file in the same folder, flush it to disk, then rename.

    A rename within one file system is atomic, so a process killed at any moment leaves
    either the previous checkpoint or the new one on disk, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint_atomic`, with `weights_only=True`
    so that a file from elsewhere cannot run code while loading."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Train one first with gpt_train.py.")
    return torch.load(path, map_location=map_location, weights_only=True)
