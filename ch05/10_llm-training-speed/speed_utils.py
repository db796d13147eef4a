"""Helpers shared by `00_orig.py`, `01_opt_single_gpu.py` and `02_opt_multi_gpu_ddp.py`.

Three groups:

* **Data**: the larger book (Tiny Shakespeare, public domain, ~338k GPT-2 tokens), a
  token file written once and memory-mapped, and `TokenWindows`, which hands out the
  windows of each optimizer step by step number alone. That makes resuming trivial
  and lets every DDP rank read only its own share of each global batch.
* **Accounting**: FLOPs per token, a table of peak FLOP/s per device name, MFU, a
  throughput meter with synchronized timers, and peak memory.
* **Files**: JSON and PNG outputs written atomically.

The settings of a run and the command line are in `speed_settings.py`.
"""

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ch05_utils import DATA_DIR_ENV, cache_dir, fetch_verified, read_text_file
from previous_chapters import get_tokenizer

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_NAME = "tinyshakespeare.txt"



#####################################
# Data
#####################################

def default_text_path() -> Path:
    """Tiny Shakespeare: `$CH05_DATA_DIR/tinyshakespeare.txt` if that variable is set,
    else downloaded once into the cache and checked against its SHA-256."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = Path(data_dir) / TINYSHAKESPEARE_NAME
        if not local.is_file():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={data_dir} is set but holds no {TINYSHAKESPEARE_NAME}; "
                                    "add it there or pass --text-file.")
        return local
    return fetch_verified(TINYSHAKESPEARE_URL, cache_dir() / TINYSHAKESPEARE_NAME, TINYSHAKESPEARE_SHA256)


def book_text_path(text_file: Path | None = None) -> Path:
    """The text of the course's `main` functions: `text_file`, else `middlemarch.txt` in the
    working directory if it is there (the file the course downloads), else `default_text_path()`."""
    if text_file is not None:
        return Path(text_file)
    if Path("middlemarch.txt").is_file():
        return Path("middlemarch.txt")
    return default_text_path()


def write_token_file(text_path: Path, token_path: Path) -> None:
    """Encode the text with GPT-2's tokenizer into a flat uint16 `.npy` file, atomically.

    GPT-2's 50,257 ids fit in 16 bits, half the size of int32. Written to a temporary
    name and renamed, so a reader never sees a half-written file.
    """
    ids = np.asarray(get_tokenizer().encode(read_text_file(text_path), allowed_special={"<|endoftext|>"}),
                     dtype=np.uint16)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, ids)

    _publish(token_path, write)


def load_tokens(token_path: Path) -> np.ndarray:
    """The token file, memory-mapped: only the windows a process touches are read from disk."""
    return np.load(token_path, mmap_mode="r")


class TokenWindows:
    """Non-overlapping windows of `context_length` + 1 tokens from one token array.

    Windows are shuffled with a permutation that depends only on (seed, epoch), so every
    process computes the same order without talking to the others. Optimizer step `s`
    uses `global_batch` consecutive windows of that order; they are cut into micro-batches
    of `micro_batch_size`, numbered 0, 1, ... With DDP, rank r of W ranks with A
    accumulation steps each takes micro-batches r*A .. r*A + A - 1. One process with
    W*A accumulation steps therefore sees exactly the same windows in the same
    micro-batches as W ranks together.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, seed: int = 123):
        self.tokens = tokens
        self.context_length = context_length
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // context_length

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed + epoch))

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_windows // global_batch

    def micro_batch(self, step: int, micro_index: int, micro_batch_size: int,
                    micro_batches_per_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, shape (micro_batch_size, context_length)) of one micro-batch."""
        global_batch = micro_batch_size * micro_batches_per_step
        per_epoch = self.steps_per_epoch(global_batch)
        if per_epoch == 0:
            raise ValueError(f"The text has only {self.num_windows} windows of {self.context_length} tokens, fewer "
                             f"than one global batch of {global_batch}; use a smaller batch or a longer text.")
        epoch, step_in_epoch = divmod(step, per_epoch)
        start = step_in_epoch * global_batch + micro_index * micro_batch_size
        windows = self.order(epoch)[start:start + micro_batch_size].tolist()
        ctx = self.context_length
        rows = np.stack([np.asarray(self.tokens[w * ctx:w * ctx + ctx + 1], dtype=np.int64) for w in windows])
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]


def split_tokens(tokens: np.ndarray, train_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation tokens: the first `train_ratio` of the text, and the rest."""
    split = int(train_ratio * len(tokens))
    return tokens[:split], tokens[split:]


#####################################
# Accounting
#####################################

# Dense peak FLOP/s (no 2:4 sparsity) from the vendors' data sheets, keyed by the name that
# torch.cuda.get_device_name() reports, and by the precision the matrix products run in.
# A device that is not listed gets MFU "unknown": a guessed peak would make a made-up MFU.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # H100 SXM5
    "NVIDIA H100 PCIe": {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "NVIDIA H200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # same chip as the H100 SXM5
    "NVIDIA A100-SXM4-80GB": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "NVIDIA A100 80GB PCIe": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
}


def matmul_params(cfg: dict) -> int:
    """N in "6N": every parameter except the token and position embedding tables.

    The embeddings are lookups (no multiply-adds); the output head is a real matrix
    product and is counted (this model does not tie it to the token embedding). Biases
    and LayerNorm scales are counted too (under 0.1% of N). `vocab_size` is the real
    vocabulary: padding it for speed adds no useful work.
    """
    d, n_layers, vocab = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    attention = 3 * d * d + (3 * d if cfg["qkv_bias"] else 0) + d * d + d
    feed_forward = d * 4 * d + 4 * d + 4 * d * d + d
    norms = 2 * 2 * d
    return n_layers * (attention + feed_forward + norms) + 2 * d + d * vocab


def flops_per_token(cfg: dict) -> float:
    """Training FLOPs per token: 6N + 12 * n_layers * context_length * emb_dim.

    6N: each parameter does one multiply-add (2 FLOPs) per token in the forward pass
    and two in the backward pass (gradients of inputs and of weights). The attention
    term counts Q @ K^T and attention @ V the same way (2 * 2 * T * d forward per layer
    and token, times 3 for forward + backward), for the full T x T score matrix, i.e.
    *not* halved for the causal mask. This is the convention of the PaLM paper
    (appendix B) and nanoGPT, so MFU figures are comparable with theirs; kernels that
    skip the masked half (FlashAttention) do less work than is counted here.
    """
    return 6 * matmul_params(cfg) + 12 * cfg["n_layers"] * cfg["context_length"] * cfg["emb_dim"]


def device_name(device: torch.device) -> str:
    """The name the peak table is keyed by: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return device.type


def peak_flops(name: str, precision: str) -> float | None:
    """Peak FLOP/s of device `name` in `precision` ('bf16', 'tf32' or 'fp32'), None if not listed."""
    return PEAK_FLOPS.get(name, {}).get(precision)


def mfu(tokens_per_s: float, flops_token: float, name: str, precision: str) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the device's peak (None: unknown)."""
    peak = peak_flops(name, precision)
    return None if peak is None else tokens_per_s * flops_token / peak


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished all queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class ThroughputMeter:
    """Tokens per second over optimizer steps, from synchronized timers.

    `start()` marks the beginning of a step, `stop(tokens)` its end; both first wait for
    the device, since a GPU runs kernels asynchronously and an unsynchronized clock
    measures only how fast Python queues them. The first `warmup_steps` steps are not
    counted (they include torch.compile's compilation, cuDNN/cuBLAS autotuning and
    allocator growth). Time between `stop` and the next `start` (evaluation,
    checkpoints) is not counted either. `clock` and `sync` can be replaced in tests.
    """

    def __init__(self, warmup_steps: int, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.sync = sync
        self.clock = clock
        self.steps = 0
        self.measured_steps = 0
        self.measured_tokens = 0
        self.measured_seconds = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self.sync()
        self._t0 = self.clock()

    def stop(self, tokens: int, discard: bool = False) -> None:
        """End a step of `tokens` tokens; `discard=True` leaves it out (it did extra work)."""
        if self._t0 is None:
            raise RuntimeError("ThroughputMeter.stop() called without start()")
        self.sync()
        elapsed = self.clock() - self._t0
        self._t0 = None
        self.steps += 1
        if self.steps > self.warmup_steps and not discard:
            self.measured_steps += 1
            self.measured_tokens += tokens
            self.measured_seconds += elapsed

    @property
    def tokens_per_s(self) -> float | None:
        """None until at least one step after the warm-up was measured."""
        if self.measured_steps == 0 or self.measured_seconds <= 0:
            return None
        return self.measured_tokens / self.measured_seconds


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA caching allocator's peak of allocated tensor
    memory on a GPU; the process's peak resident set size (everything, Python included) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak GPU memory allocated by tensors"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return rss_kib * scale, "peak resident set size of the process"


def precision_name(device: torch.device, bf16: bool, tf32: bool) -> str:
    """The precision the matrix products run in, which selects the peak FLOP/s."""
    if bf16:
        return "bf16"
    if tf32 and device.type == "cuda":
        return "tf32"
    return "fp32"


def throughput_report(meter: ThroughputMeter, cfg: dict, device: torch.device, precision: str) -> dict:
    """Everything the benchmark table needs, as a dict (also written to --metrics-json)."""
    name = device_name(device)
    flops_token = flops_per_token(cfg)
    tps = meter.tokens_per_s
    mem_bytes, mem_what = peak_memory(device)
    util = None if tps is None else mfu(tps, flops_token, name, precision)
    return {
        "device": name,
        "precision": precision,
        "tokens_per_s": tps,
        "measured_steps": meter.measured_steps,
        "warmup_steps_excluded": min(meter.steps, meter.warmup_steps),
        "other_steps_excluded": max(meter.steps - meter.warmup_steps, 0) - meter.measured_steps,
        "flops_per_token": flops_token,
        "model_flops_per_s": None if tps is None else tps * flops_token,
        "mfu": util,
        "peak_memory_bytes": mem_bytes,
        "peak_memory_what": mem_what,
    }


def format_report(report: dict) -> str:
    """The report as the lines a script prints at the end of a run."""
    if report["tokens_per_s"] is None:
        return (f"Throughput: not measured (only {report['warmup_steps_excluded']} warm-up step(s) ran; "
                "run more steps than --warmup-steps).")
    util = "unknown (device not in the peak FLOP/s table)" if report["mfu"] is None else f"{report['mfu']:.1%}"
    return "\n".join([
        f"Throughput: {report['tokens_per_s']:,.0f} tokens/s over {report['measured_steps']} steps "
        f"(synchronized timers; excluded: the first {report['warmup_steps_excluded']} warm-up/compile step(s), "
        f"{report['other_steps_excluded']} step(s) that evaluated or sampled, all evaluation time)",
        f"Model FLOPs: {report['flops_per_token'] / 1e6:,.1f} MFLOP/token (6N + attention, PaLM convention) "
        f"-> {report['model_flops_per_s'] / 1e12:.3f} TFLOP/s",
        f"MFU on {report['device']} ({report['precision']}): {util}",
        f"Peak memory: {report['peak_memory_bytes'] / 2**30:.2f} GiB ({report['peak_memory_what']})",
    ])


def write_json_atomic(obj: dict, path: Path) -> None:
    """Write JSON beside `path` under a name of this process, then rename it into place:
    a reader (or a crash) never sees half a file, and two processes never share a temporary file."""
    _publish(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def save_figure_atomic(fig, path: Path) -> None:
    """`fig.savefig` to a temporary file beside `path`, then rename: a killed run keeps the previous plot."""
    _publish(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))


class OutputLock:
    """`folder/.lock` holds the process id of the run using `folder`; a second run is refused.

    Two runs writing the same `checkpoint.pth` would overwrite each other's work. A lock
    left by a run that was killed (its process is gone) is taken over.
    """

    def __init__(self, folder: Path | None):
        self.path = None if folder is None else Path(folder) / ".lock"
        self.held = False

    def acquire(self) -> "OutputLock":
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _lock_owner(self.path)
                if owner is not None and owner != os.getpid() and _process_alive(owner):
                    raise ValueError(f"--output-dir {self.path.parent} is in use by another run (process {owner}); "
                                     "wait for it to finish or pass another --output-dir.") from None
                self.path.unlink(missing_ok=True)  # left behind by a run that no longer exists
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise ValueError(f"Could not take the lock {self.path}; another run may be starting in that folder.")

    def release(self) -> None:
        if self.held and _lock_owner(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _publish(path: Path, write: Callable[[Path], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                         min_seconds: float = 1.0) -> float:
    """Sustained FLOP/s of square `size` x `size` matrix products, repeated for at least
    `min_seconds`: the practical peak of this device, for judging model FLOP/s where the
    peak table has no entry (e.g. a CPU). Timing a second or more, rather than a burst of
    a few products, gives the rate the device keeps up over a training step."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    repeats, elapsed = 0, 0.0
    while elapsed < min_seconds:
        for _ in range(5):
            a @ b
        synchronize(device)
        repeats += 5
        elapsed = time.perf_counter() - start
    return 2 * size**3 * repeats / elapsed
