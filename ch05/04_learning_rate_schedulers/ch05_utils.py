"""What the chapter's scripts need beyond the book's code: data, devices, seeds, checkpoints.

The book's functions (the loss, the training loop, `generate`, `load_weights_into_gpt`,
...) live in `previous_chapters.py`; they are imported here too, so `from ch05_utils
import generate` keeps working. This module adds what makes the scripts robust: a
verified download of the-verdict, train/validation loaders with a seeded shuffle,
device selection, RNG state for exact resume, atomic checkpoints, and loading model
weights from any of the files the book and our scripts write.

Shared file. The canonical copy is ch05/01_main-chapter-code/ch05_utils.py; `make sync`
(scripts/sync_shared_code.py) overwrites the copies in the other ch05 folders with it,
so edit the canonical file, never a copy.
"""

import errno
import hashlib
import os
import random
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from previous_chapters import (  # noqa: F401  (re-exported: the scripts import them from here)
    GPT_CONFIG_124M,
    GPTModel,
    TrainProgress,
    calc_loss_batch,
    calc_loss_loader,
    create_dataloader_v1,
    evaluate_model,
    generate,
    generate_and_print_sample,
    get_tokenizer,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
    train_model_simple,
)

THE_VERDICT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
)
THE_VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
DATA_DIR_ENV = "CH05_DATA_DIR"  # folder with local copies of the chapter's data files
CACHE_DIR_ENV = "CH05_CACHE_DIR"  # where downloads are kept (default ~/.cache/llm-from-scratch-ch05)


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
    """`torch.save` to `<path>.tmp` in the same folder, flush it to disk, then rename.

    A rename within one file system is atomic, so a process killed at any moment leaves
    either the previous checkpoint or the new one on disk, never a half-written file. A
    `.tmp` left by a killed save is simply overwritten by the next one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"Disk full while saving {path}; the previous file there (if any) is "
                                        "intact. Free some space and resume.") from None
        raise


def publish_atomic(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` and rename the result to `path`: readers of `path` never
    see a half-written file. The temporary name keeps the extension (`loss.tmp.png`), so
    writers that pick a format by extension, like matplotlib, still work."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class FolderInUseError(RuntimeError):
    """Another running job holds the lock on this output folder."""


class RunLock:
    """An exclusive lock on an output folder, so two runs never write the same files.

    The lock is an OS file lock on `<folder>/<name>`, which the operating system
    releases when the process ends however it ends, so a killed run leaves no stale
    lock. The file holds the owner's process id, for the error message.
    """

    def __init__(self, folder: str | Path, name: str = ".run.lock"):
        self.path = Path(folder) / name
        self._file = None

    def __enter__(self) -> "RunLock":
        self._file = open(self.path, "a+")
        try:
            _lock_file(self._file)
        except OSError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            raise FolderInUseError(f"{self.path.parent} is in use by a running job ({owner}). Wait for it to "
                               "finish, or choose another output folder.") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()  # closing releases the lock


def _lock_file(f) -> None:
    f.seek(0)
    if sys.platform == "win32":
        import msvcrt
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Load a checkpoint written by `save_checkpoint_atomic`, with `weights_only=True`
    so that a file from elsewhere cannot run code while loading.

    With `mmap=True` tensors are read from disk only when used (for inference, which
    needs the weights but not the optimizer state stored beside them). A missing,
    truncated or foreign file is a one-line error that names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}. Train one first with gpt_train.py.")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # the legacy format
    except Exception as err:  # truncated zip, garbage bytes, a pickle that is not plain data...
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({reason}). It may be truncated or "
                         "corrupt: save or download it again.") from None


#####################################
# Model weights from any file the book or our scripts write
#####################################

# GPT-2's sizes: the number of attention heads cannot be read off the weights' shapes.
GPT2_HEADS_BY_EMB_DIM = {768: 12, 1024: 16, 1280: 20, 1600: 25}
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DistributedDataParallel


def read_model_state_dict(path: str | Path, *, mmap: bool = True,
                          map_location: str | torch.device = "cpu") -> tuple[dict, dict | None]:
    """The model weights stored in `path`, and the model config if the file holds one.

    Accepts gpt_train.py's `checkpoint.pth` ({"model", "config", ...}), the book's
    weights-only `model.pth` (a plain state dict) and the book's
    `model_and_optimizer.pth` ({"model_state_dict", "optimizer_state_dict"}). With
    `mmap=True` (the default) the file is memory-mapped, so an optimizer state stored
    beside the weights is never read from disk.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}. Check the path (train one with gpt_train.py).")
    obj = load_checkpoint(path, map_location, mmap=mmap)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state_dict, config = obj["model"], obj.get("config")
    elif isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        state_dict, config = obj["model_state_dict"], None
    else:
        state_dict, config = obj, None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds no model state dict: expected a file saved from a GPTModel "
                         "(torch.save(model.state_dict(), ...)) or a gpt_train.py checkpoint.")
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict, config


def config_from_state_dict(state_dict: dict, n_heads: int | None = None) -> dict:
    """The GPTModel config that fits the tensors of `state_dict`.

    Sizes come from the tensors' shapes. The head count does not change any shape, so
    it is GPT-2's for GPT-2's widths (768 -> 12, ...) unless `n_heads` is given.
    """
    try:
        vocab_size, emb_dim = state_dict["tok_emb.weight"].shape
        context_length = state_dict["pos_emb.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise ValueError(f"The weights have no usable {err} tensor: they are not a GPTModel's.") from None
    n_layers = len({k.split(".")[1] for k in state_dict if k.startswith("trf_blocks.")})
    if n_heads is None:
        if emb_dim not in GPT2_HEADS_BY_EMB_DIM:
            raise ValueError(f"The weights have emb_dim={emb_dim}, not a GPT-2 width, so the number of "
                             "attention heads is unknown: pass it (n_heads / --n-heads).")
        n_heads = GPT2_HEADS_BY_EMB_DIM[emb_dim]
    return {**GPT_CONFIG_124M, "vocab_size": vocab_size, "context_length": context_length, "emb_dim": emb_dim,
            "n_heads": n_heads, "n_layers": n_layers, "qkv_bias": "trf_blocks.0.att.W_query.bias" in state_dict}


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, source: str | Path, *,
                            assign: bool = False) -> None:
    """`model.load_state_dict(state_dict, assign=assign)` (strict), with one-line errors
    that name `source`. (`assign=True` takes the tensors themselves, for a model built on
    the meta device.)

    Files saved before the causal mask was stored in the state dict lack only the
    `*.att.mask` entries; the model's own masks are the same constants, so they stay.
    """
    missing = set(model.state_dict()) - set(state_dict)
    unexpected = set(state_dict) - set(model.state_dict())
    if unexpected or any(not k.endswith(".att.mask") for k in missing):
        some = sorted(missing)[:3] + sorted(unexpected)[:3]
        raise ValueError(f"{source} does not fit this model: {len(missing)} missing and {len(unexpected)} "
                         f"unexpected tensors (e.g. {', '.join(some)}). Is it a GPTModel of this shape?")
    for name, tensor in model.state_dict().items():
        if name in state_dict and tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, the model "
                             f"expects {tuple(tensor.shape)}. Build the model with the config it was trained with.")
    model.load_state_dict(state_dict, strict=not missing, assign=assign)
    check_weights_loaded(model)


def check_weights_loaded(model: torch.nn.Module) -> None:
    """Refuse a model that still holds tensors on PyTorch's `meta` device.

    A model built on `meta` has shapes but no values; a tensor that no state dict
    filled would make every forward pass fail or, after `to_empty`, silently compute
    with whatever bytes the memory held.
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    on_meta = [name for name, tensor in tensors if tensor.is_meta]
    if on_meta:
        raise ValueError(f"{len(on_meta)} tensors of the model were never loaded (still on the meta device), "
                         f"e.g. {on_meta[0]}: load a complete state dict, with strict=True.")


def load_gpt_model(path: str | Path, *, n_heads: int | None = None) -> tuple[GPTModel, dict]:
    """A GPTModel (on the CPU, in eval mode) with the weights of `path`, and its config.

    `path` is any file `read_model_state_dict` accepts; a file without a config gets
    one from the tensors' shapes (`config_from_state_dict`).
    """
    state_dict, config = read_model_state_dict(path)
    if config is None:
        config = config_from_state_dict(state_dict, n_heads)
    model = GPTModel(config)
    load_state_dict_checked(model, state_dict, path)
    return model.eval(), config
