"""The settings of a training run in this folder: one frozen dataclass, and the command line that fills it.

`TrainSettings` holds every choice of a run (model shape, data, training, output, and
the optimization switches). The scripts build it from their command line
(`settings_from_args`), the course's `main(gpt_config, settings)` entry points build it
from the course's dicts, and the library code (`speed_train.py`) only ever reads it.
It checks its values when it is created, so a bad number (NaN, infinity, out of range)
is refused before any work starts, whichever way the run was started.
"""

import argparse
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from ch05_utils import DATA_DIR_ENV
from previous_chapters import GPT_CONFIG_124M
from speed_utils import TINYSHAKESPEARE_NAME, TINYSHAKESPEARE_URL

MAX_CONTEXT_LENGTH = 1024
MODEL_PRESETS = {
    "124M": GPT_CONFIG_124M,
    "small": {**GPT_CONFIG_124M, "emb_dim": 256, "n_heads": 4, "n_layers": 4},
    "tiny": {**GPT_CONFIG_124M, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
}
CUDA_ONLY = ("tf32", "pin_memory")


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run of 00/01/02 needs to know; the defaults are the command line's."""

    # Data and model
    text_file: Path | None = None
    model: str = "124M"
    context_length: int = 1024
    drop_rate: float = 0.1
    # Training
    batch_size: int = 4
    num_epochs: int = 1
    max_steps: int | None = None
    lr: float = 4e-4
    weight_decay: float = 0.1
    eval_freq: int = 50
    eval_iter: int = 5
    warmup_steps: int = 2
    seed: int = 123
    device: str = "auto"
    start_context: str = "First Citizen:"
    # Output (None: write no files, as the course's `main` functions)
    output_dir: Path | None = Path("output")
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    metrics_json: Path | None = None
    progress_bar: bool = True
    # Optimizations (01 and 02; all off: the chapter's computation)
    mask_on_the_fly: bool = False
    tf32: bool = False
    fused_adamw: bool = False
    pin_memory: bool = False
    bf16: bool = False
    pure_bf16: bool = False
    native_ops: bool = False
    sdpa: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    pad_vocab: bool = False
    grad_accum_steps: int = 1
    no_decay_bias_norm: bool = False
    keep_grad_buffers: bool = False
    lr_warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        _at_least(self, batch_size=1, num_epochs=1, eval_freq=1, grad_accum_steps=1,
                  eval_iter=0, warmup_steps=0, checkpoint_every=0)
        if self.max_steps is not None:
            _at_least(self, max_steps=1)
        if not 1 <= self.context_length <= MAX_CONTEXT_LENGTH:
            raise ValueError(f"--context-length must be between 1 and {MAX_CONTEXT_LENGTH}, "
                             f"got {self.context_length}.")
        _in_range(self, "drop_rate", 0, 1, "in [0, 1)", upper_open=True)
        _in_range(self, "lr", 0, math.inf, "a positive finite number", lower_open=True)
        _in_range(self, "weight_decay", 0, math.inf, "a finite number >= 0")
        _in_range(self, "lr_warmup_frac", 0, 1, "between 0 and 1")
        _in_range(self, "min_lr_ratio", 0, 1, "between 0 and 1")
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"--model must be one of {', '.join(sorted(MODEL_PRESETS))}, got {self.model!r}.")
        if self.compile_backend not in ("inductor", "aot_eager"):
            raise ValueError(f"--compile-backend must be inductor or aot_eager, got {self.compile_backend!r}.")
        if self.bf16 and self.pure_bf16:
            raise ValueError("--bf16 (autocast, fp32 weights) and --pure-bf16 (bf16 weights) exclude each other.")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pick one.")

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / "checkpoint.pth"

    def optimization_flags(self) -> list[str]:
        """The switches that are on, as command-line flags (for the run's first line)."""
        flags = [f"--{f.name.replace('_', '-')}" for f in fields(self)
                 if f.name in OPTIMIZATION_SWITCHES and getattr(self, f.name)]
        if self.grad_accum_steps > 1:
            flags.append(f"--grad-accum-steps {self.grad_accum_steps}")
        return flags


OPTIMIZATION_SWITCHES = ("mask_on_the_fly", "tf32", "fused_adamw", "pin_memory", "bf16", "pure_bf16", "native_ops",
                         "sdpa", "compile", "pad_vocab", "no_decay_bias_norm", "keep_grad_buffers")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(settings: TrainSettings, **minimums: int) -> None:
    for name, minimum in minimums.items():
        value = getattr(settings, name)
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"{_flag(name)} must be an integer >= {minimum}, got {value!r}.")


def _in_range(settings: TrainSettings, name: str, low: float, high: float, what: str,
              lower_open: bool = False, upper_open: bool = False) -> None:
    """Refuse NaN, infinity and values outside [low, high] (or the open ends asked for)."""
    value = getattr(settings, name)
    ok = isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value > low if lower_open else value >= low) and (value < high if upper_open else value <= high)
    if not ok:
        raise ValueError(f"{_flag(name)} must be {what}, got {value!r}.")


def check_device_support(settings: TrainSettings, device) -> None:
    """Switches that only exist on CUDA GPUs are refused elsewhere instead of silently ignored."""
    for name in CUDA_ONLY:
        if getattr(settings, name) and device.type != "cuda":
            raise ValueError(f"{_flag(name)} works only with --device cuda (this run uses {device}); "
                             "leave it out on this device.")


def check_output_dir(settings: TrainSettings) -> None:
    """Before any work: the output folder can be written, and a finished run there is not overwritten by accident."""
    out = settings.output_dir
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a folder; pass a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--output-dir {out} cannot be written ({err.strerror}); pass a writable folder.") from None
    if settings.checkpoint_path.exists() and not (settings.resume or settings.overwrite):
        raise ValueError(f"{settings.checkpoint_path} already exists: pass --resume to continue that run "
                         "or --overwrite to start a new one.")


def course_run_settings(gpt_config: dict, settings: dict, *, eval_freq: int, on_cuda: bool,
                        **extras) -> TrainSettings:
    """The run that the course's optimized `main(gpt_config, settings)` (01 and 02) performs.

    `settings` holds the course's keys `learning_rate`, `num_epochs`, `batch_size` and
    `weight_decay`. Like the course: a constant learning rate, evaluation on one batch
    every `eval_freq` steps, fused AdamW, bfloat16 weights, `torch.compile`, and TF32 and
    pinned memory on CUDA GPUs. `extras` are further `TrainSettings` fields.
    """
    return TrainSettings(
        context_length=gpt_config["context_length"], drop_rate=gpt_config["drop_rate"],
        batch_size=settings["batch_size"], num_epochs=settings["num_epochs"], lr=settings["learning_rate"],
        weight_decay=settings["weight_decay"], eval_freq=eval_freq, eval_iter=1, warmup_steps=1,
        lr_warmup_frac=0.0, min_lr_ratio=1.0, fused_adamw=True, pure_bf16=True, compile=True,
        tf32=on_cuda, pin_memory=on_cuda, overwrite=True, **extras)


def model_config(settings: TrainSettings) -> dict:
    """The GPTModel config of the run: the preset shape with the run's context and dropout."""
    return {**MODEL_PRESETS[settings.model], "context_length": settings.context_length,
            "drop_rate": settings.drop_rate}


#####################################
# Command line
#####################################

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every script of this folder has, with the same defaults (those of `TrainSettings`)."""
    d = TrainSettings()
    parser.add_argument("--text-file", type=Path, default=None,
                        help=f"UTF-8 training text. Default: Tiny Shakespeare, downloaded once from "
                             f"{TINYSHAKESPEARE_URL} and checked against its SHA-256, or taken from "
                             f"${DATA_DIR_ENV}/{TINYSHAKESPEARE_NAME} if that variable is set.")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default=d.model, help="Model shape.")
    parser.add_argument("--context-length", type=int, default=d.context_length,
                        help=f"Tokens per training window (at most {MAX_CONTEXT_LENGTH}).")
    parser.add_argument("--drop-rate", type=float, default=d.drop_rate, help="Dropout rate.")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="Windows per (micro-)batch.")
    parser.add_argument("--num-epochs", type=int, default=d.num_epochs)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="Stop after this many optimizer steps in total (the run can be resumed).")
    parser.add_argument("--lr", type=float, default=d.lr, help="(Peak) AdamW learning rate.")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--eval-freq", type=int, default=d.eval_freq, help="Evaluate every N optimizer steps.")
    parser.add_argument("--eval-iter", type=int, default=d.eval_iter,
                        help="Validation batches per evaluation (0: none; 00_orig.py needs >= 1).")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help="Steps left out of the throughput figure (warm-up, compilation).")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda or mps.")
    parser.add_argument("--output-dir", type=Path, default=d.output_dir)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help="Also save a checkpoint every N steps (0: only at the end).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from --output-dir/checkpoint.pth (starts fresh if there is none).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Start over even if --output-dir already holds a checkpoint.")
    parser.add_argument("--metrics-json", type=Path, default=None,
                        help="Also write the throughput figures to this JSON file (the benchmark reads it).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    """One switch per optimization (all off: the chapter's computation)."""
    d = TrainSettings()
    group = parser.add_argument_group("optimizations (each off by default)")
    group.add_argument("--mask-on-the-fly", action="store_true",
                       help="Build the causal mask in each forward pass instead of storing a buffer per block.")
    group.add_argument("--tf32", action="store_true",
                       help="Let fp32 matrix products use TF32 tensor cores (CUDA only).")
    group.add_argument("--fused-adamw", action="store_true", help="AdamW as one fused kernel.")
    group.add_argument("--pin-memory", action="store_true",
                       help="Copy batches from pinned host memory without blocking (CUDA only).")
    group.add_argument("--bf16", action="store_true",
                       help="bfloat16 autocast for forward and loss; weights, gradients and AdamW stay fp32.")
    group.add_argument("--pure-bf16", action="store_true",
                       help="Opt-in: keep the weights themselves in bfloat16 (no fp32 master copy; small "
                            "updates can be rounded away).")
    group.add_argument("--native-ops", action="store_true", help="PyTorch's fused LayerNorm and GELU kernels.")
    group.add_argument("--sdpa", action="store_true",
                       help="scaled_dot_product_attention (FlashAttention on GPUs) instead of explicit attention.")
    group.add_argument("--compile", action="store_true", help="torch.compile the model.")
    group.add_argument("--compile-backend", choices=["inductor", "aot_eager"], default=d.compile_backend,
                       help="torch.compile backend: inductor generates fused kernels (slow to compile on a "
                            "CPU); aot_eager only captures the graphs (the tests use it to check --compile quickly).")
    group.add_argument("--pad-vocab", action="store_true", help="Pad the vocabulary to a multiple of 64.")
    group.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps,
                       help="Micro-batches of --batch-size per optimizer step (a larger batch in the same memory).")
    group.add_argument("--no-decay-bias-norm", action="store_true",
                       help="No weight decay on biases and LayerNorm parameters.")
    group.add_argument("--keep-grad-buffers", action="store_true",
                       help="Zero the gradients in place after each step instead of freeing them, so the next "
                            "backward pass does not allocate them again (matters on CPUs).")
    parser.add_argument("--lr-warmup-frac", type=float, default=d.lr_warmup_frac,
                        help="Fraction of the steps with linear learning-rate warm-up before the cosine decay.")
    parser.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                        help="Final learning rate as a fraction of --lr.")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The frozen settings from parsed arguments (options a script does not have keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if hasattr(args, f.name)}
    values["progress_bar"] = not args.no_progress
    return TrainSettings(**values)
