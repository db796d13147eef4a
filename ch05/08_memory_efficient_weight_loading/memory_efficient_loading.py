"""Five ways to load a GPTModel's weights from disk, and how to measure what they cost.

Every `load_*` function takes a weights file, the model config (None: the file's own, or
read off the tensors' shapes) and a device, and returns a ready-to-use GPTModel in eval
mode. They differ in how many copies of the weights exist at once:

  load_naive          model (1 copy) + full state dict (2nd copy), then copy across.
  load_sequential     model on the device; the state dict stays on the CPU and is moved
                      over one tensor at a time, so the device never holds a 2nd copy.
  load_meta_assign    model built on the "meta" device (no memory), the loaded tensors
                      become its parameters (`load_state_dict(assign=True)`): 1 copy.
  load_mmap           like load_meta_assign, but `torch.load(mmap=True)` maps the file
                      instead of reading it: the OS pages weights in as they are used.
  load_safetensors_lazy  model on "meta"; tensors are read from a .safetensors file one
                      at a time, straight onto the device.

The `.pth` loaders read the three files the chapter's code writes: the book's weights-only
`model.pth` (`torch.save(model.state_dict(), ...)`), the book's `model_and_optimizer.pth`
and gpt_train.py's `checkpoint.pth`. The causal masks are part of the state dict, as in
the book; files saved before that (without `*.att.mask` entries) get fresh masks. A file
that is truncated, foreign or of another shape is a one-line ValueError naming it, and no
model is returned that still holds a tensor without data (see `check_fully_loaded`).
"""

import gc
import re
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from ch05_utils import (
    check_weights_loaded,
    config_from_state_dict,
    publish_atomic,
    read_model_state_dict,
    save_checkpoint_atomic,
)
from previous_chapters import GPT_CONFIG_124M, GPTModel

# GPT-2's shapes with the context length of the released models (1024). Like the book's
# model after `load_weights_into_gpt`, our GPTModel has its own output head (not tied to
# the token embedding), so "gpt2-xl" has 1.64B parameters.
MODEL_CONFIGS = {
    "gpt2-xl": {**GPT_CONFIG_124M, "context_length": 1024, "emb_dim": 1600, "n_heads": 25, "n_layers": 48,
                "qkv_bias": True},
    "gpt2-large": {**GPT_CONFIG_124M, "context_length": 1024, "emb_dim": 1280, "n_heads": 20, "n_layers": 36,
                   "qkv_bias": True},
    "gpt2-small": {**GPT_CONFIG_124M, "context_length": 1024, "qkv_bias": True},
    "tiny": {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
             "qkv_bias": True},
}


#####################################
# Random weights on disk
#####################################

def weight_paths(folder: str | Path, model_name: str) -> tuple[Path, Path]:
    """Where the .pth and .safetensors copies of `model_name`'s random weights live."""
    folder = Path(folder)
    return folder / f"{model_name}.pth", folder / f"{model_name}.safetensors"


def state_dict_bytes(cfg: dict) -> int:
    """Bytes of a float32 state dict of config `cfg`, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse to start writing what will not fit, instead of failing half-way."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(f"{folder} has {free / 1024**3:.1f} GiB free, but the weights need "
                      f"{needed / 1024**3:.1f} GiB. Free some space or pick another --weights-dir.")


def save_random_weights(cfg: dict, folder: str | Path, model_name: str, seed: int = 123) -> tuple[Path, Path]:
    """Write a randomly initialized GPTModel's state dict as .pth and as .safetensors.

    Real GPT-2 XL weights are not needed to measure loading: only their shapes and
    bytes matter. Both files are written once (kept if present), each under a
    temporary name first, so a run killed half-way never leaves a short file under the
    final name. The .pth is the book's format (`torch.save(model.state_dict(), ...)`).
    The safetensors copy is made from the memory-mapped .pth, so at most one copy of
    the weights is ever held in ordinary memory, even for the 1.6B model.
    """
    pth_path, st_path = weight_paths(folder, model_name)
    pth_path.parent.mkdir(parents=True, exist_ok=True)
    missing = [p for p in (pth_path, st_path) if not p.is_file()]
    check_free_space(pth_path.parent, len(missing) * state_dict_bytes(cfg))
    if not pth_path.is_file():
        torch.manual_seed(seed)
        model = GPTModel(cfg)
        save_checkpoint_atomic(model.state_dict(), pth_path)
        del model
        gc.collect()
    if not st_path.is_file():
        state_dict, _ = read_model_state_dict(pth_path)  # memory-mapped: nothing is copied
        save_safetensors_atomic(state_dict, st_path)
        del state_dict
    return pth_path, st_path


def save_safetensors_atomic(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """`safetensors.torch.save_file` to a temporary name in the same folder, then rename."""
    from safetensors.torch import save_file

    publish_atomic(path, lambda tmp: save_file(dict(state_dict), tmp, metadata={"format": "pt"}))


#####################################
# Reading and checking weight files
#####################################

def resolve_config(cfg: dict | None, file_cfg: dict | None, shapes: Mapping[str, torch.Size],
                   source: str | Path) -> dict:
    """The config to build the model with: the caller's, else the file's, else one read off the shapes."""
    if cfg is not None:
        return cfg
    if file_cfg is not None:
        return dict(file_cfg)
    try:
        return config_from_state_dict({name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    except ValueError as err:
        raise ValueError(f"{source}: {err} Or pass the model's config.") from None


def is_mask(name: str) -> bool:
    return name.endswith(".att.mask")


def check_weights_fit(shapes: Mapping[str, torch.Size], dtypes: Mapping[str, torch.dtype],
                      model: torch.nn.Module, source: str | Path) -> None:
    """Raise a one-line ValueError naming `source` and the first tensor that is missing,
    unexpected, of the wrong shape or not floating point for `model` (which may be on
    the meta device: only its shapes are used).

    Missing causal masks are allowed: files saved before the masks were part of the
    state dict lack them, and `with_causal_masks` makes them again.
    """
    expected = {name: t.shape for name, t in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes and not is_mask(k)]
    unexpected = [k for k in shapes if k not in expected]
    emb_dim, context_length = model.pos_emb.weight.shape[1], model.pos_emb.weight.shape[0]
    hint = (f"Is it a GPTModel of this shape (emb_dim={emb_dim}, n_layers={len(model.trf_blocks)}, "
            f"context_length={context_length})?")
    if missing:
        raise ValueError(f"{source} lacks tensor {missing[0]!r} ({len(missing)} missing in all). {hint}")
    if unexpected:
        raise ValueError(f"{source} has tensor {unexpected[0]!r} that the model has no place for "
                         f"({len(unexpected)} unexpected in all). {hint}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name]):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(shape)}, the model expects "
                             f"{tuple(expected[name])}. {hint}")
        if not dtypes[name].is_floating_point and not (is_mask(name) and dtypes[name] == torch.bool):
            raise ValueError(f"{source}: tensor {name!r} has dtype {dtypes[name]}; weights must be floating point.")


def causal_mask(context_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The causal mask MultiHeadAttention keeps: 1 above the diagonal (future positions)."""
    return torch.triu(torch.ones(context_length, context_length, device=device), diagonal=1)


def with_causal_masks(state_dict: dict, model: torch.nn.Module, device: torch.device | str = "cpu") -> dict:
    """`state_dict`, plus a causal mask for every attention layer of `model` whose mask it lacks."""
    missing = {k: t.shape[0] for k, t in model.state_dict().items() if is_mask(k) and k not in state_dict}
    if missing:
        state_dict = dict(state_dict)
        for name, context_length in missing.items():
            state_dict[name] = causal_mask(context_length, device)
    return state_dict


def checked_state_dict(state_dict: dict, model: torch.nn.Module, source: str | Path,
                       device: torch.device | str = "cpu") -> dict:
    """`state_dict` checked against `model` (one-line errors naming `source`), with any
    missing causal masks added: ready for a strict `load_state_dict`."""
    check_weights_fit({k: t.shape for k, t in state_dict.items()}, {k: t.dtype for k, t in state_dict.items()},
                      model, source)
    return with_causal_masks(state_dict, model, device)


def check_causal_masks(model: torch.nn.Module) -> None:
    """Raise if an attention layer's mask is not the causal mask.

    A model moved off the meta device with `to_empty` gets uninitialized memory in every
    tensor; a loading loop over `named_parameters()` alone never fills the buffers, so
    the masks keep whatever bytes were there and the model silently attends to the future.
    """
    for name, buffer in model.named_buffers():
        if is_mask(name) and not torch.equal(buffer.bool(), causal_mask(buffer.shape[0], buffer.device).bool()):
            raise ValueError(f"{name} is not the causal mask (uninitialized memory?): copy every tensor of "
                             "the state dict, buffers included, e.g. with model.load_state_dict(state_dict).")


def check_fully_loaded(model: torch.nn.Module) -> None:
    """Refuse a model that still holds a tensor without data (on the meta device) or an
    attention mask that is not causal; both would make it compute nonsense."""
    check_weights_loaded(model)
    check_causal_masks(model)


def read_weights_and_config(path: str | Path, cfg: dict | None, device: torch.device | str = "cpu",
                            mmap: bool = False) -> tuple[dict, dict]:
    """(state dict, config to build the model with) from any of the `.pth` files the chapter's
    code writes (`ch05_utils.read_model_state_dict`), read the way each method wants it."""
    state_dict, file_cfg = read_model_state_dict(path, mmap=mmap, map_location=device)
    return state_dict, resolve_config(cfg, file_cfg, {k: t.shape for k, t in state_dict.items()}, path)


def meta_model(cfg: dict) -> GPTModel:
    """A GPTModel with shapes but no data: free to build, whatever its size."""
    with torch.device("meta"):
        return GPTModel(cfg)


#####################################
# The loading methods
#####################################

def load_naive(pth_path: str | Path, cfg: dict | None = None, device: torch.device | str = "cpu") -> GPTModel:
    """The textbook way: build the model, load the whole state dict, copy it in."""
    state_dict, cfg = read_weights_and_config(pth_path, cfg, device)
    model = GPTModel(cfg).to(device)
    model.load_state_dict(checked_state_dict(state_dict, model, pth_path, device))
    return model.eval()


def load_sequential(pth_path: str | Path, cfg: dict | None = None,
                    device: torch.device | str = "cpu") -> GPTModel:
    """Keep the state dict on the CPU and copy it into the device's model tensor by tensor.

    Saves device (GPU) memory: the device holds the model plus one tensor in transit,
    never a second full copy. CPU memory still holds the whole state dict. Every entry
    of the state dict is copied, the causal-mask buffers included.
    """
    state_dict, cfg = read_weights_and_config(pth_path, cfg, "cpu")
    model = GPTModel(cfg).to(device)
    state_dict = checked_state_dict(state_dict, model, pth_path, "cpu")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state_dict.pop(name).to(device))  # pop: each CPU tensor is freed once copied
    return model.eval()


def load_meta_assign(pth_path: str | Path, cfg: dict | None = None,
                     device: torch.device | str = "cpu") -> GPTModel:
    """Build the model without memory on "meta", then make the loaded tensors its parameters."""
    state_dict, cfg = read_weights_and_config(pth_path, cfg, device)
    model = meta_model(cfg)
    model.load_state_dict(checked_state_dict(state_dict, model, pth_path, device), assign=True)
    check_fully_loaded(model)
    return model.eval()


def load_mmap(pth_path: str | Path, cfg: dict | None = None, device: torch.device | str = "cpu") -> GPTModel:
    """Map the file into memory instead of reading it; the OS pages weights in when used.

    On the CPU the parameters stay backed by the file, and those pages can be dropped
    and re-read under memory pressure. For a GPU, each tensor is copied over as the
    model is moved, so the CPU never holds more than the pages being copied.
    """
    state_dict, cfg = read_weights_and_config(pth_path, cfg, "cpu", mmap=True)
    model = meta_model(cfg)
    model.load_state_dict(checked_state_dict(state_dict, model, pth_path, "cpu"), assign=True)
    model.to(device)
    check_fully_loaded(model)
    return model.eval()


def load_safetensors_lazy(st_path: str | Path, cfg: dict | None = None,
                          device: torch.device | str = "cpu") -> GPTModel:
    """Read one tensor at a time from a .safetensors file, straight onto `device`.

    The file's header lists every tensor's name, dtype and shape, so the whole file is
    checked against the model before a single weight is read.
    """
    from safetensors import safe_open

    shapes, dtypes = safetensors_header(st_path)
    model = meta_model(resolve_config(cfg, None, shapes, st_path))
    check_weights_fit(shapes, dtypes, model, st_path)
    with safe_open(st_path, framework="pt", device=str(device)) as f:
        for name in shapes:
            model.load_state_dict({name: f.get_tensor(name)}, strict=False, assign=True)
    model.load_state_dict(with_causal_masks({}, model, device), strict=False, assign=True)  # files without masks
    check_fully_loaded(model)
    return model.eval()


# safetensors' dtype names -> torch, for the check before loading
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(st_path: str | Path) -> tuple[dict[str, torch.Size], dict[str, torch.dtype]]:
    """Name -> shape and name -> dtype of every tensor in a .safetensors file, read from
    its header alone; a one-line ValueError naming the file if it is not readable."""
    from safetensors import SafetensorError, safe_open

    if not Path(st_path).is_file():
        raise FileNotFoundError(f"No safetensors file at {st_path}.")
    try:
        with safe_open(st_path, framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            shapes = {name: torch.Size(s.get_shape()) for name, s in slices.items()}
            dtypes = {name: _SAFETENSORS_DTYPES.get(s.get_dtype(), torch.uint8) for name, s in slices.items()}
    except (SafetensorError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{st_path} is not a readable safetensors file ({reason}). It may be truncated or "
                         "corrupt: write or download it again.") from None
    return shapes, dtypes


def check_weights_file(path: str | Path, cfg: dict) -> None:
    """Check a .pth or .safetensors file against `cfg` without reading its weights
    (the .pth is memory-mapped, the .safetensors header is all that is read)."""
    if Path(path).suffix == ".safetensors":
        shapes, dtypes = safetensors_header(path)
    else:
        state_dict, _ = read_model_state_dict(path)
        shapes, dtypes = {k: t.shape for k, t in state_dict.items()}, {k: t.dtype for k, t in state_dict.items()}
    check_weights_fit(shapes, dtypes, meta_model(cfg), path)


METHODS = {
    "naive": load_naive,
    "sequential": load_sequential,
    "meta_assign": load_meta_assign,
    "mmap": load_mmap,
    "safetensors_lazy": load_safetensors_lazy,
}


def weights_file_for(method: str, folder: str | Path, model_name: str) -> Path:
    """The file a method reads: the .safetensors copy for safetensors_lazy, else the .pth."""
    pth_path, st_path = weight_paths(folder, model_name)
    return st_path if method == "safetensors_lazy" else pth_path


#####################################
# Measuring memory
#####################################

def _vm_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def can_reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak RSS (VmHWM) through /proc/self/clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Ask the C allocator to give freed memory back to the operating system.

    glibc keeps freed blocks below its mmap threshold (up to 32 MB, and a model's tensors
    are mostly below it) for reuse, so after `del model` the process's RSS stays high and
    the next measurement in the same process starts from a misleading baseline.
    `malloc_trim(0)` hands that memory back; elsewhere this does nothing.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


class RSSPeak:
    """The peak resident memory (RSS) of this process since `start()`.

    On Linux the kernel's own high-water mark is reset by `start()` and read by
    `peak()`, so nothing is missed. Elsewhere a thread samples the RSS every
    millisecond (psutil), which can miss a very short peak.
    """

    def __init__(self):
        self.use_hwm = sys.platform.startswith("linux") and can_reset_peak_rss()
        self._thread = None

    def start(self) -> int:
        """Reset the peak; returns the RSS now (bytes)."""
        gc.collect()
        self.stop()
        if self.use_hwm:
            Path("/proc/self/clear_refs").write_text("5")
            return _vm_kib("VmRSS") * 1024
        import psutil

        self._process = psutil.Process()
        self._samples = [self._process.memory_info().rss]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self._samples[0]

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self._process.memory_info().rss)
            time.sleep(0.001)

    def peak(self) -> int:
        """The highest RSS since `start()` (bytes)."""
        if self.use_hwm:
            return _vm_kib("VmHWM") * 1024
        return max(self._samples)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


class PeakMemory:
    """Peak resident memory (RSS) of this process inside a `with` block, and of the GPU.

    Attributes after the block: `rss_before`, `peak_rss` (bytes), `gpu_peak` (bytes or
    None, from PyTorch's allocator), `seconds`.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._rss = RSSPeak()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._gpu_before = torch.cuda.memory_allocated()
        self.rss_before = self._rss.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start
        self.peak_rss = self._rss.peak()
        self._rss.stop()
        self.gpu_peak = torch.cuda.max_memory_allocated() - self._gpu_before if self.cuda else None

    @property
    def added_rss(self) -> int:
        """How far the block raised the RSS above where it started."""
        return self.peak_rss - self.rss_before


def measure_load(method: str, folder: str | Path, model_name: str,
                 device: torch.device | str = "cpu") -> tuple[GPTModel, PeakMemory]:
    """Load with one method and use the model once (a forward pass touches every weight,
    which matters for mmap, where weights are read only when first used)."""
    cfg = MODEL_CONFIGS[model_name]
    path = weights_file_for(method, folder, model_name)
    with PeakMemory(device) as memory:
        model = METHODS[method](path, cfg, device)
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long, device=device))
    return model, memory


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size
