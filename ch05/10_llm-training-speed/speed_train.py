"""The optimized model and training loop behind `01_opt_single_gpu.py` and `02_opt_multi_gpu_ddp.py`.

Every optimization is a switch, so its effect can be measured alone. The model is
always the chapter's `GPTModel`: the switches only swap some of its modules for
faster ones that hold the *same* parameters under the same names, so checkpoints
and weights stay interchangeable with the chapter's code.
"""

import math
import os
import signal
import threading
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from ch05_utils import get_rng_states, load_checkpoint, save_checkpoint_atomic, set_rng_states
from lr_schedule import apply_lr, lr_at_step
from previous_chapters import GPTModel, LayerNorm, MultiHeadAttention
from speed_settings import TrainSettings
from speed_utils import (
    ThroughputMeter,
    TokenWindows,
    format_report,
    load_tokens,
    precision_name,
    save_figure_atomic,
    split_tokens,
    synchronize,
    throughput_report,
    write_json_atomic,
)
from torch.nn.parallel import DistributedDataParallel


#####################################
# Faster modules with the chapter's parameters
#####################################

class FastMultiHeadAttention(nn.Module):
    """The chapter's attention with its mask built on the fly, or computed by
    `scaled_dot_product_attention`.

    The chapter stores a (context_length x context_length) mask in every block and
    slices it each step. Building the mask on the fly keeps no such buffer. SDPA with
    `is_causal=True` needs no mask at all and dispatches to a fused kernel
    (FlashAttention or memory-efficient attention on GPUs, a flash-style kernel on
    CPUs) that never stores the T x T score matrix and skips the masked half.
    """

    def __init__(self, att: MultiHeadAttention, use_sdpa: bool):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = att.d_out, att.num_heads, att.head_dim
        self.W_query, self.W_key, self.W_value = att.W_query, att.W_key, att.W_value
        self.out_proj, self.dropout = att.out_proj, att.dropout
        self.use_sdpa = use_sdpa
        if "mask" in att.state_dict():  # the chapter stores its mask in state dicts: keep files interchangeable
            self.context_length = att.mask.shape[0]
            self._register_state_dict_hook(_add_chapter_mask)
            self._register_load_state_dict_pre_hook(_drop_chapter_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        if self.use_sdpa:
            context = F.scaled_dot_product_attention(
                queries, keys, values, dropout_p=self.dropout.p if self.training else 0.0, is_causal=True)
        else:
            mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=x.device).triu(diagonal=1)
            attn_scores = (queries @ keys.transpose(2, 3)).masked_fill(mask, -torch.inf)
            attn_weights = self.dropout(torch.softmax(attn_scores / self.head_dim**0.5, dim=-1))
            context = attn_weights @ values
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))


def _add_chapter_mask(module: FastMultiHeadAttention, state_dict: dict, prefix: str, local_metadata) -> None:
    """Save the chapter's `mask` entry (a constant) although this module keeps no such buffer."""
    ctx = module.context_length
    state_dict[prefix + "mask"] = torch.triu(torch.ones(ctx, ctx, device=module.out_proj.weight.device), diagonal=1)


def _drop_chapter_mask(state_dict: dict, prefix: str, *args) -> None:
    """Accept the chapter's `mask` entry when loading: this module builds the mask itself."""
    state_dict.pop(prefix + "mask", None)


class NativeLayerNorm(nn.Module):
    """The chapter's LayerNorm computed by PyTorch's fused `F.layer_norm` kernel (one
    pass instead of separate mean, variance, subtract, divide, scale and shift)."""

    def __init__(self, norm: LayerNorm):
        super().__init__()
        self.eps, self.scale, self.shift = norm.eps, norm.scale, norm.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class NativeGELU(nn.Module):
    """The same tanh-approximate GELU as the chapter's, as one fused PyTorch kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round the vocabulary up (50,257 -> 50,304), so the output head's matrix has
    dimensions that GPU matrix kernels tile without a ragged remainder. The extra
    logits are never targets, so training simply learns to give them low scores."""
    return math.ceil(vocab_size / multiple) * multiple


def build_model(cfg: dict, mask_on_the_fly: bool = False, sdpa: bool = False, native_ops: bool = False,
                pad_vocab: bool = False) -> GPTModel:
    """The chapter's `GPTModel`, initialized exactly as the chapter does, with modules swapped as asked."""
    model = GPTModel({**cfg, "vocab_size": padded_vocab_size(cfg["vocab_size"])} if pad_vocab else cfg)
    for block in model.trf_blocks:
        if sdpa or mask_on_the_fly:
            block.att = FastMultiHeadAttention(block.att, use_sdpa=sdpa)
        if native_ops:
            block.norm1, block.norm2 = NativeLayerNorm(block.norm1), NativeLayerNorm(block.norm2)
            block.ff.layers[1] = NativeGELU()
    if native_ops:
        model.final_norm = NativeLayerNorm(model.final_norm)
    return model


#####################################
# Optimizer
#####################################

def build_optimizer(model: nn.Module, lr: float, weight_decay: float, no_decay_bias_norm: bool,
                    fused: bool) -> torch.optim.AdamW:
    """AdamW, optionally fused into one kernel over all parameters (instead of a loop of
    small kernels per tensor), and optionally without weight decay on biases and
    LayerNorm parameters (1-D tensors): pulling those towards 0 has no regularizing
    purpose, it only shifts and shrinks activations."""
    if no_decay_bias_norm:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


#####################################
# Training
#####################################

def enable_device_settings(settings: TrainSettings) -> None:
    """Process-wide settings that the switches ask for."""
    if settings.tf32:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls may use TF32 tensor cores


def to_device(x: torch.Tensor, pin_memory: bool, device: torch.device) -> torch.Tensor:
    """Pinned (page-locked) host memory lets the copy run asynchronously, overlapping
    with the GPU work already queued, instead of staging through a pageable buffer."""
    if pin_memory:
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def autocast_context(settings: TrainSettings, device: torch.device):
    if settings.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def micro_batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings,
                     device: torch.device) -> torch.Tensor:
    with autocast_context(settings, device):
        logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def evaluate_val_loss(model: nn.Module, val_windows: TokenWindows, settings: TrainSettings,
                      device: torch.device) -> float:
    """Mean loss over the first --eval-iter validation batches (same batches every time)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(settings.eval_iter):
            x, y = val_windows.micro_batch(i, 0, settings.batch_size, 1)
            x, y = to_device(x, settings.pin_memory, device), to_device(y, settings.pin_memory, device)
            total += micro_batch_loss(model, x, y, settings, device).item()
    model.train()
    return total / settings.eval_iter


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: continuing (or saving) would only spread it."""


def check_finite_weights(model: nn.Module, step: int, checkpoint_path: Path | None) -> None:
    """Refuse to save weights that hold NaN or infinity: they would replace the last good checkpoint."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDiverged(f"The weights are not finite after step {step}; they were not saved "
                               f"({checkpoint_path} keeps the last good checkpoint, if any). Lower --lr.")


class StopRequest:
    """Ctrl-C or SIGTERM while training: finish the current step, save a checkpoint, stop.

    Use it as a context manager around the loop: it installs the handlers and puts the
    previous ones back afterwards (so a test or a notebook keeps its own Ctrl-C). With
    `grace_seconds`, a process that has not finished that long after the signal exits
    anyway (a DDP rank can wait forever in a collective whose peer is gone).
    """

    def __init__(self, grace_seconds: float | None = None):
        self.signal: int | None = None
        self.grace_seconds = grace_seconds
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None and self.grace_seconds is not None:
            deadline = threading.Timer(self.grace_seconds, os._exit, (128 + signum,))
            deadline.daemon = True  # never keeps a finished process alive
            deadline.start()
        self.signal = signum


class Trainer:
    """Runs optimizer steps of 01 (world_size == 1) and 02 (one Trainer per DDP rank).

    Step `s` of every rank uses micro-batches `rank * A .. rank * A + A - 1` of the
    global batch (see `TokenWindows`); `train_model` is what gradients flow through
    (the DDP wrapper for 02), `raw_model` the plain module that is saved.
    """

    def __init__(self, settings: TrainSettings, cfg: dict, device: torch.device, raw_model: nn.Module,
                 train_model: nn.Module, optimizer: torch.optim.Optimizer, train_windows: TokenWindows,
                 val_windows: TokenWindows, meter: ThroughputMeter, rank: int = 0, world_size: int = 1,
                 all_reduce_mean=None, gather=None):
        self.settings, self.cfg, self.device = settings, cfg, device
        self.raw_model, self.train_model, self.optimizer = raw_model, train_model, optimizer
        self.train_windows, self.val_windows, self.meter = train_windows, val_windows, meter
        self.rank, self.world_size = rank, world_size
        self.checkpoint_path = settings.checkpoint_path
        self.all_reduce_mean = all_reduce_mean or (lambda t: t)
        self.gather = gather or (lambda obj: [obj])
        self.micro_batches = settings.grad_accum_steps * world_size
        self.global_batch = settings.batch_size * self.micro_batches
        self.tokens_per_step = self.global_batch * cfg["context_length"]
        steps_per_epoch = train_windows.steps_per_epoch(self.global_batch)
        if steps_per_epoch == 0:
            raise ValueError(
                f"The training split has {train_windows.num_windows} windows of {cfg['context_length']} tokens, "
                f"fewer than one global batch of {self.global_batch}; use a smaller "
                "--batch-size/--grad-accum-steps/--context-length or a longer text.")
        # The schedule spans all epochs; --max-steps only stops early (a resumed run continues it).
        self.schedule_steps = steps_per_epoch * settings.num_epochs
        self.total_steps = min(self.schedule_steps, settings.max_steps or self.schedule_steps)
        self.warmup = int(settings.lr_warmup_frac * self.schedule_steps)
        self.step = 0
        self.stopped_by: int | None = None
        self.train_losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []

    def checkpoint(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": self.cfg, "global_batch": self.global_batch,
                "step": self.step, "train_losses": self.train_losses,
                "val_losses": [list(v) for v in self.val_losses]}

    def save(self) -> None:
        """Rank 0 writes the checkpoint; the RNG states of every rank go into it (for dropout)."""
        if self.checkpoint_path is None:
            return
        check_finite_weights(self.raw_model, self.step, self.checkpoint_path)
        rng_states = self.gather(get_rng_states())
        if self.rank == 0:
            save_checkpoint_atomic({**self.checkpoint(), "rng": rng_states}, self.checkpoint_path)

    def resume(self) -> None:
        ckpt = load_checkpoint(self.checkpoint_path, map_location=self.device)
        if ckpt["config"] != self.cfg or ckpt["global_batch"] != self.global_batch:
            raise ValueError(f"{self.checkpoint_path} was trained with config {ckpt['config']} and a global batch "
                             f"of {ckpt['global_batch']} windows, not {self.cfg} and {self.global_batch}; use the "
                             "same settings or another --output-dir.")
        if len(ckpt["rng"]) != self.world_size:
            raise ValueError(f"{self.checkpoint_path} was written by {len(ckpt['rng'])} process(es), this run has "
                             f"{self.world_size}; resume with the same number of processes.")
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        self.train_losses = list(ckpt["train_losses"])
        self.val_losses = [tuple(v) for v in ckpt["val_losses"]]
        set_rng_states(ckpt["rng"][self.rank])

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss over all ranks."""
        settings, device = self.settings, self.device
        lr = lr_at_step(self.step, self.schedule_steps, settings.lr, self.warmup, 0.0,
                        settings.lr * settings.min_lr_ratio)
        apply_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        accum = settings.grad_accum_steps
        for a in range(accum):
            x, y = self.train_windows.micro_batch(self.step, self.rank * accum + a, settings.batch_size,
                                                  self.micro_batches)
            x, y = to_device(x, settings.pin_memory, device), to_device(y, settings.pin_memory, device)
            # Under DDP, gradients are averaged across ranks only on the last micro-batch.
            defer_sync = a < accum - 1 and isinstance(self.train_model, DistributedDataParallel)
            with self.train_model.no_sync() if defer_sync else nullcontext():
                loss = micro_batch_loss(self.train_model, x, y, settings, device)
                (loss / accum).backward()
            loss_sum += loss.detach()
        self.optimizer.step()
        # Freed gradients must be allocated again by the next backward pass. A GPU's caching
        # allocator makes that free; on a CPU, tensors this large go back to the operating
        # system and come back page by page, so keeping them and zeroing in place is faster.
        self.optimizer.zero_grad(set_to_none=not settings.keep_grad_buffers)
        return self.all_reduce_mean(loss_sum / accum).item()

    def run(self, print_fn=print, progress_bar: bool = True, stop: StopRequest | None = None) -> None:
        """Train up to `total_steps`; a signal caught by `stop` ends the run early, after a save."""
        settings = self.settings
        steps = range(self.step, self.total_steps)
        if progress_bar and self.rank == 0:
            from tqdm.auto import tqdm
            steps = tqdm(steps, total=self.total_steps, initial=self.step, desc="Training", leave=False)
        for _ in steps:
            self.meter.start()
            loss = self.train_step()
            self.meter.stop(self.tokens_per_step)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"The training loss became {loss} at step {self.step + 1}; that step was not "
                                       f"saved ({self.checkpoint_path} keeps the last good one, if any). Lower --lr.")
            self.train_losses.append(loss)
            self.step += 1
            if settings.eval_iter and (self.step % settings.eval_freq == 0 or self.step == self.total_steps):
                val_loss = evaluate_val_loss(self.eval_model, self.val_windows, settings, self.device)
                self.val_losses.append((self.step, val_loss))
                if self.rank == 0:
                    print_fn(f"Step {self.step:06d}: train loss {loss:.3f}, val loss {val_loss:.3f}")
            if settings.checkpoint_every and self.step % settings.checkpoint_every == 0:
                self.save()
            if stop is not None and self._any_rank_stops(stop):
                self.stopped_by = stop.signal or signal.SIGTERM
                break
        self.save()

    def _any_rank_stops(self, stop: StopRequest) -> bool:
        """All ranks must stop after the same step (the save is collective): agree on it."""
        flag = torch.tensor(float(stop.signal is not None), device=self.device)
        return self.all_reduce_mean(flag).item() > 0

    @property
    def eval_model(self) -> nn.Module:
        """The (compiled) model without the DDP wrapper: evaluation needs no gradient sync."""
        model = self.train_model
        return model.module if isinstance(model, DistributedDataParallel) else model


def make_trainer(settings: TrainSettings, cfg: dict, device: torch.device, token_path: Path, rank: int = 0,
                 world_size: int = 1, wrap=None, all_reduce_mean=None, gather=None,
                 model: nn.Module | None = None) -> Trainer:
    """Model, optimizer, data and meter as the switches in `settings` ask; `wrap` adds DDP.

    `model` replaces the chapter's `GPTModel` built from `cfg` (the course's API passes
    its own optimized model this way); the precision and compile switches still apply.
    """
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    if model is None:
        model = build_model(cfg, mask_on_the_fly=settings.mask_on_the_fly, sdpa=settings.sdpa,
                            native_ops=settings.native_ops, pad_vocab=settings.pad_vocab)
    raw_model = model.to(device)
    if settings.pure_bf16:
        raw_model = raw_model.to(torch.bfloat16)
    optimizer = build_optimizer(raw_model, settings.lr, settings.weight_decay, settings.no_decay_bias_norm,
                                settings.fused_adamw)
    train_model = torch.compile(raw_model, backend=settings.compile_backend) if settings.compile else raw_model
    if wrap is not None:
        train_model = wrap(train_model)
    train_tokens, val_tokens = split_tokens(load_tokens(token_path))
    ctx = cfg["context_length"]
    if len(val_tokens) < settings.batch_size * ctx + 1:
        raise ValueError(f"The validation split ({len(val_tokens):,} tokens) is shorter than one batch of "
                         f"{settings.batch_size} x {ctx} tokens; use a longer text or a smaller batch/context.")
    trainer = Trainer(settings, cfg, device, raw_model, train_model, optimizer,
                      TokenWindows(train_tokens, ctx, settings.seed), TokenWindows(val_tokens, ctx, settings.seed),
                      ThroughputMeter(settings.warmup_steps, sync=lambda: synchronize(device)),
                      rank=rank, world_size=world_size, all_reduce_mean=all_reduce_mean, gather=gather)
    torch.manual_seed(settings.seed + 1000 * (rank + 1))  # dropout: different on each rank
    if settings.resume and trainer.checkpoint_path is not None and trainer.checkpoint_path.exists():
        trainer.resume()  # restores every RNG state too
        if rank == 0:
            print(f"Resuming from {trainer.checkpoint_path} at step {trainer.step}.")
    return trainer


def course_results(trainer: Trainer) -> tuple[list, list, list, nn.Module]:
    """What the course's `main` returns: training and validation loss at each evaluation, the
    tokens this process has seen by then, and the trained model."""
    steps = [step for step, _ in trainer.val_losses]
    return ([trainer.train_losses[step - 1] for step in steps], [loss for _, loss in trainer.val_losses],
            [step * trainer.tokens_per_step // trainer.world_size for step in steps], trainer.raw_model)


def finish_run(trainer: Trainer, settings: TrainSettings, device: torch.device) -> dict:
    """Print the throughput report and write losses.json, loss.png and (if asked) --metrics-json."""
    report = throughput_report(trainer.meter, trainer.cfg, device, precision_of(settings, device))
    report["tokens_per_step"] = trainer.tokens_per_step
    if trainer.rank != 0:
        return report
    if trainer.stopped_by is not None:
        print(f"Stopped by {signal.Signals(trainer.stopped_by).name} after step {trainer.step}; "
              f"{trainer.checkpoint_path} is saved: continue with --resume.")
    print(format_report(report))
    if settings.metrics_json is not None:
        write_json_atomic(report, settings.metrics_json)
    if settings.output_dir is not None:
        write_json_atomic({"train_losses": trainer.train_losses, "val_losses": trainer.val_losses},
                          settings.output_dir / "losses.json")
        plot_step_losses(trainer.train_losses, trainer.val_losses, settings.output_dir / "loss.png")
    return report


def plot_step_losses(train_losses: list[float], val_losses: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(train_losses) + 1), train_losses, label="Training loss (per step)")
    if val_losses:
        ax.plot(*zip(*val_losses, strict=True), marker="o", linestyle="-.", label="Validation loss")
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def precision_of(settings: TrainSettings, device: torch.device) -> str:
    return precision_name(device, bf16=settings.bf16 or settings.pure_bf16, tf32=settings.tf32)
