"""Five ways to load a GPTModel's weights from disk, and how to measure what they cost.

Every `load_*` function takes the weights file, the model config and a device, and
returns a ready-to-use GPTModel in eval mode. They differ in how many copies of the
weights exist at once:

  load_naive          model (1 copy) + full state dict (2nd copy), then copy across.
  load_sequential     model on the device; the state dict stays on the CPU and is moved
                      over one tensor at a time, so the device never holds a 2nd copy.
  load_meta_assign    model built on the "meta" device (no memory), the loaded tensors
                      become its parameters (`load_state_dict(assign=True)`): 1 copy.
  load_mmap           like load_meta_assign, but `torch.load(mmap=True)` maps the file
                      instead of reading it: the OS pages weights in as they are used.
  load_safetensors_lazy  model on "meta"; tensors are read from a .safetensors file one
                      at a time, straight onto the device.

A model built on "meta" has no data in its buffers either. The causal masks are
non-persistent buffers (not in the state dict), so `rebuild_causal_masks` makes them
again after loading; without it the model would fail or attend to the future.
"""

import gc
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch
from previous_chapters import GPT_CONFIG_124M, GPTModel, MultiHeadAttention

# GPT-2's shapes with the context length of the released models (1024). Our GPTModel has
# its own output head (not tied to the token embedding), so "gpt2-xl" has 1.64B parameters.
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


def save_random_weights(cfg: dict, folder: str | Path, model_name: str, seed: int = 123) -> tuple[Path, Path]:
    """Write a randomly initialized GPTModel's state dict as .pth and as .safetensors.

    Real GPT-2 XL weights are not needed to measure loading: only their shapes and
    bytes matter. Both files are written once (kept if present). The safetensors copy
    is made from the memory-mapped .pth, so at most one copy of the weights is ever
    held in anonymous memory, even for the 1.6B model.
    """
    from safetensors.torch import save_file

    pth_path, st_path = weight_paths(folder, model_name)
    pth_path.parent.mkdir(parents=True, exist_ok=True)
    if not pth_path.is_file():
        torch.manual_seed(seed)
        model = GPTModel(cfg)
        tmp = pth_path.with_suffix(".pth.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, pth_path)
        del model
        gc.collect()
    if not st_path.is_file():
        state_dict = torch.load(pth_path, mmap=True, weights_only=True)
        tmp = st_path.with_suffix(".safetensors.tmp")
        save_file(state_dict, tmp, metadata={"format": "pt"})
        os.replace(tmp, st_path)
        del state_dict
    return pth_path, st_path


#####################################
# The loading methods
#####################################

def rebuild_causal_masks(model: torch.nn.Module, device: torch.device | str) -> None:
    """Re-create each attention layer's causal mask on `device`.

    The masks are not in the state dict (`persistent=False`), so loading weights into a
    model built on the meta device leaves them as data-less meta tensors.
    """
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            n = module.mask.shape[0]
            module.mask = torch.triu(torch.ones(n, n, device=device), diagonal=1).bool()


def check_fully_loaded(model: torch.nn.Module) -> None:
    """Raise if a parameter or buffer is still on the meta device, naming it."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"{name} was never loaded: it is still a meta tensor without data.")


def load_naive(pth_path: str | Path, cfg: dict, device: torch.device | str = "cpu") -> GPTModel:
    """The textbook way: build the model, load the whole state dict, copy it in."""
    model = GPTModel(cfg).to(device)
    state_dict = torch.load(pth_path, map_location=device, weights_only=True)
    model.load_state_dict(state_dict)
    return model.eval()


def load_sequential(pth_path: str | Path, cfg: dict, device: torch.device | str = "cpu") -> GPTModel:
    """Keep the state dict on the CPU and copy it into the device's model tensor by tensor.

    Saves device (GPU) memory: the device holds the model plus one tensor in transit,
    never a second full copy. CPU memory still holds the whole state dict.
    """
    model = GPTModel(cfg).to(device)
    state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state_dict.pop(name))  # pop: each CPU tensor is freed once copied
    if state_dict:
        raise KeyError(f"Unexpected tensors in {pth_path}: {sorted(state_dict)[:3]}")
    return model.eval()


def load_meta_assign(pth_path: str | Path, cfg: dict, device: torch.device | str = "cpu") -> GPTModel:
    """Build the model without memory on "meta", then make the loaded tensors its parameters."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    state_dict = torch.load(pth_path, map_location=device, weights_only=True)
    model.load_state_dict(state_dict, assign=True)
    rebuild_causal_masks(model, device)
    check_fully_loaded(model)
    return model.eval()


def load_mmap(pth_path: str | Path, cfg: dict, device: torch.device | str = "cpu") -> GPTModel:
    """Map the file into memory instead of reading it; the OS pages weights in when used.

    On the CPU the parameters stay backed by the file, and those pages can be dropped
    and re-read under memory pressure. For a GPU, each tensor is copied over as the
    model is moved, so the CPU never holds more than the pages being copied.
    """
    with torch.device("meta"):
        model = GPTModel(cfg)
    state_dict = torch.load(pth_path, mmap=True, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, assign=True)
    rebuild_causal_masks(model, "cpu")  # a meta buffer cannot be moved, so make the masks first
    model.to(device)
    check_fully_loaded(model)
    return model.eval()


def load_safetensors_lazy(st_path: str | Path, cfg: dict, device: torch.device | str = "cpu") -> GPTModel:
    """Read one tensor at a time from a .safetensors file, straight onto `device`."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = GPTModel(cfg)
    with safe_open(st_path, framework="pt", device=str(device)) as f:
        for name in f.keys():
            result = model.load_state_dict({name: f.get_tensor(name)}, strict=False, assign=True)
            if result.unexpected_keys:
                raise KeyError(f"Unexpected tensor {name!r} in {st_path}: the model has no such parameter.")
    rebuild_causal_masks(model, device)
    check_fully_loaded(model)
    return model.eval()


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


class PeakMemory:
    """Peak resident memory (RSS) of this process inside a `with` block, and of the GPU.

    On Linux the kernel's own high-water mark is reset on entry and read on exit, so
    nothing is missed. Elsewhere a thread samples the RSS every millisecond (psutil),
    which can miss a very short peak. The GPU peak comes from PyTorch's allocator.
    Attributes after the block: `rss_before`, `peak_rss` (bytes), `gpu_peak` (bytes or
    None), `seconds`.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.use_hwm = sys.platform.startswith("linux") and can_reset_peak_rss()

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._gpu_before = torch.cuda.memory_allocated()
        if self.use_hwm:
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_before = _vm_kib("VmRSS") * 1024
        else:
            import psutil

            self._process = psutil.Process()
            self.rss_before = self._process.memory_info().rss
            self._samples = [self.rss_before]
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start
        if self.use_hwm:
            self.peak_rss = _vm_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_rss = max(self._samples)
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
