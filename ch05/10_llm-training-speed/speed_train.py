"""The optimized model and training loop behind `01_opt_single_gpu.py` and `02_opt_multi_gpu_ddp.py`.

Every optimization is a switch, so its effect can be measured alone. The model is
always the chapter's `GPTModel`: the switches only swap some of its modules for
faster ones that hold the *same* parameters under the same names, so checkpoints
and weights stay interchangeable with the chapter's code.
"""

import argparse
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from ch05_utils import get_rng_states, load_checkpoint, save_checkpoint_atomic, set_rng_states
from lr_schedule import apply_lr, lr_at_step
from previous_chapters import GPTModel, LayerNorm, MultiHeadAttention
from speed_utils import (
    ThroughputMeter,
    TokenWindows,
    format_report,
    load_tokens,
    precision_name,
    split_tokens,
    synchronize,
    throughput_report,
    write_json_atomic,
)

CUDA_ONLY_FLAGS = ("tf32", "pin_memory")


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
# Command line
#####################################

def add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    """One switch per optimization (all off: the chapter's computation)."""
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
    group.add_argument("--compile-backend", choices=["inductor", "aot_eager"], default="inductor",
                       help="torch.compile backend: inductor generates fused kernels (slow to compile on a "
                            "CPU); aot_eager only captures the graphs (the tests use it to check --compile quickly).")
    group.add_argument("--pad-vocab", action="store_true", help="Pad the vocabulary to a multiple of 64.")
    group.add_argument("--grad-accum-steps", type=int, default=1,
                       help="Micro-batches of --batch-size per optimizer step (a larger batch in the same memory).")
    group.add_argument("--no-decay-bias-norm", action="store_true",
                       help="No weight decay on biases and LayerNorm parameters.")
    group.add_argument("--keep-grad-buffers", action="store_true",
                       help="Zero the gradients in place after each step instead of freeing them, so the next "
                            "backward pass does not allocate them again (matters on CPUs).")
    parser.add_argument("--lr-warmup-frac", type=float, default=0.1,
                        help="Fraction of the steps with linear learning-rate warm-up before the cosine decay.")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="Final learning rate as a fraction of --lr.")


def check_optimization_arguments(args: argparse.Namespace, device: torch.device) -> None:
    if args.grad_accum_steps < 1:
        raise ValueError(f"--grad-accum-steps must be at least 1, got {args.grad_accum_steps}.")
    if not 0 <= args.lr_warmup_frac <= 1:
        raise ValueError(f"--lr-warmup-frac must be between 0 and 1, got {args.lr_warmup_frac}.")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio must be between 0 and 1, got {args.min_lr_ratio}.")
    if args.bf16 and args.pure_bf16:
        raise ValueError("--bf16 (autocast, fp32 weights) and --pure-bf16 (bf16 weights) exclude each other.")
    for flag in CUDA_ONLY_FLAGS:
        if getattr(args, flag) and device.type != "cuda":
            raise ValueError(f"--{flag.replace('_', '-')} works only with --device cuda (this run uses {device}); "
                             "leave it out on this device.")


def enable_device_settings(args: argparse.Namespace, device: torch.device) -> None:
    """Process-wide settings that the switches ask for."""
    if args.tf32:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls may use TF32 tensor cores


#####################################
# Training
#####################################

def to_device(x: torch.Tensor, pin_memory: bool, device: torch.device) -> torch.Tensor:
    """Pinned (page-locked) host memory lets the copy run asynchronously, overlapping
    with the GPU work already queued, instead of staging through a pageable buffer."""
    if pin_memory:
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def autocast_context(args: argparse.Namespace, device: torch.device):
    if args.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def micro_batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args, device) -> torch.Tensor:
    with autocast_context(args, device):
        logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def evaluate_val_loss(model: nn.Module, val_windows: TokenWindows, args, device: torch.device) -> float:
    """Mean loss over the first --eval-iter validation batches (same batches every time)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(args.eval_iter):
            x, y = val_windows.micro_batch(i, 0, args.batch_size, 1)
            x, y = to_device(x, args.pin_memory, device), to_device(y, args.pin_memory, device)
            total += micro_batch_loss(model, x, y, args, device).item()
    model.train()
    return total / args.eval_iter


class Trainer:
    """Runs optimizer steps of 01 (world_size == 1) and 02 (one Trainer per DDP rank).

    Step `s` of every rank uses micro-batches `rank * A .. rank * A + A - 1` of the
    global batch (see `TokenWindows`); `train_model` is what gradients flow through
    (the DDP wrapper for 02), `raw_model` the plain module that is saved.
    """

    def __init__(self, args, cfg: dict, device: torch.device, raw_model: nn.Module, train_model: nn.Module,
                 optimizer: torch.optim.Optimizer, train_windows: TokenWindows, val_windows: TokenWindows,
                 meter: ThroughputMeter, rank: int = 0, world_size: int = 1, checkpoint_path: Path | None = None,
                 all_reduce_mean=None, gather=None):
        self.args, self.cfg, self.device = args, cfg, device
        self.raw_model, self.train_model, self.optimizer = raw_model, train_model, optimizer
        self.train_windows, self.val_windows, self.meter = train_windows, val_windows, meter
        self.rank, self.world_size = rank, world_size
        self.checkpoint_path = checkpoint_path
        self.all_reduce_mean = all_reduce_mean or (lambda t: t)
        self.gather = gather or (lambda obj: [obj])
        self.micro_batches = args.grad_accum_steps * world_size
        self.tokens_per_step = args.batch_size * cfg["context_length"] * self.micro_batches
        steps_per_epoch = train_windows.steps_per_epoch(args.batch_size * self.micro_batches)
        if steps_per_epoch == 0:
            raise ValueError(
                f"The training split has {train_windows.num_windows} windows of {cfg['context_length']} tokens, "
                f"fewer than one global batch of {args.batch_size * self.micro_batches}; use a smaller "
                "--batch-size/--grad-accum-steps/--context-length or a longer text.")
        # The schedule spans all epochs; --max-steps only stops early (a resumed run continues it).
        self.schedule_steps = steps_per_epoch * args.num_epochs
        self.total_steps = min(self.schedule_steps, args.max_steps or self.schedule_steps)
        self.warmup = int(args.lr_warmup_frac * self.schedule_steps)
        self.step = 0
        self.train_losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []

    def checkpoint(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": self.cfg, "global_batch": self.args.batch_size * self.micro_batches,
                "step": self.step, "train_losses": self.train_losses,
                "val_losses": [list(v) for v in self.val_losses]}

    def save(self) -> None:
        """Rank 0 writes the checkpoint; the RNG states of every rank go into it (for dropout)."""
        rng_states = self.gather(get_rng_states())
        if self.rank == 0 and self.checkpoint_path is not None:
            save_checkpoint_atomic({**self.checkpoint(), "rng": rng_states}, self.checkpoint_path)

    def resume(self) -> None:
        ckpt = load_checkpoint(self.checkpoint_path, map_location=self.device)
        global_batch = self.args.batch_size * self.micro_batches
        if ckpt["config"] != self.cfg or ckpt["global_batch"] != global_batch:
            raise ValueError(f"{self.checkpoint_path} was trained with config {ckpt['config']} and a global batch "
                             f"of {ckpt['global_batch']} windows, not {self.cfg} and {global_batch}; use the same "
                             "settings or another --output-dir.")
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
        args, device = self.args, self.device
        lr = lr_at_step(self.step, self.schedule_steps, args.lr, self.warmup, 0.0, args.lr * args.min_lr_ratio)
        apply_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        accum = args.grad_accum_steps
        for a in range(accum):
            x, y = self.train_windows.micro_batch(self.step, self.rank * accum + a, args.batch_size,
                                                  self.micro_batches)
            x, y = to_device(x, args.pin_memory, device), to_device(y, args.pin_memory, device)
            # Under DDP, gradients are averaged across ranks only on the last micro-batch.
            last = a == accum - 1
            sync = nullcontext() if last or not hasattr(self.train_model, "no_sync") else self.train_model.no_sync()
            with sync:
                loss = micro_batch_loss(self.train_model, x, y, args, device)
                (loss / accum).backward()
            loss_sum += loss.detach()
        self.optimizer.step()
        # Freed gradients must be allocated again by the next backward pass. A GPU's caching
        # allocator makes that free; on a CPU, tensors this large go back to the operating
        # system and come back page by page, so keeping them and zeroing in place is faster.
        self.optimizer.zero_grad(set_to_none=not args.keep_grad_buffers)
        return self.all_reduce_mean(loss_sum / accum).item()

    def run(self, print_fn=print, progress_bar: bool = True) -> None:
        args = self.args
        steps = range(self.step, self.total_steps)
        if progress_bar and self.rank == 0:
            from tqdm.auto import tqdm
            steps = tqdm(steps, total=self.total_steps, initial=self.step, desc="Training", leave=False)
        for _ in steps:
            self.meter.start()
            loss = self.train_step()
            self.meter.stop(self.tokens_per_step)
            self.train_losses.append(loss)
            self.step += 1
            if args.eval_iter and (self.step % args.eval_freq == 0 or self.step == self.total_steps):
                val_loss = evaluate_val_loss(self.eval_model, self.val_windows, args, self.device)
                self.val_losses.append((self.step, val_loss))
                if self.rank == 0:
                    print_fn(f"Step {self.step:06d}: train loss {loss:.3f}, val loss {val_loss:.3f}")
            if args.checkpoint_every and self.step % args.checkpoint_every == 0:
                self.save()
        self.save()

    @property
    def eval_model(self) -> nn.Module:
        """The (compiled) model without the DDP wrapper: evaluation needs no gradient sync."""
        model = self.train_model
        return model.module if hasattr(model, "no_sync") else model


def make_trainer(args: argparse.Namespace, cfg: dict, device: torch.device, token_path: Path, rank: int = 0,
                 world_size: int = 1, wrap=None, all_reduce_mean=None, gather=None) -> Trainer:
    """Model, optimizer, data and meter as the switches in `args` ask; `wrap` adds DDP."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = build_model(cfg, mask_on_the_fly=args.mask_on_the_fly, sdpa=args.sdpa,
                            native_ops=args.native_ops, pad_vocab=args.pad_vocab).to(device)
    if args.pure_bf16:
        raw_model = raw_model.to(torch.bfloat16)
    optimizer = build_optimizer(raw_model, args.lr, args.weight_decay, args.no_decay_bias_norm, args.fused_adamw)
    model = torch.compile(raw_model, backend=args.compile_backend) if args.compile else raw_model
    if wrap is not None:
        model = wrap(model)
    train_tokens, val_tokens = split_tokens(load_tokens(token_path))
    ctx = cfg["context_length"]
    if len(val_tokens) < args.batch_size * ctx + 1:
        raise ValueError(f"The validation split ({len(val_tokens):,} tokens) is shorter than one batch of "
                         f"{args.batch_size} x {ctx} tokens; use a longer text or a smaller batch/context.")
    trainer = Trainer(args, cfg, device, raw_model, model, optimizer,
                      TokenWindows(train_tokens, ctx, args.seed), TokenWindows(val_tokens, ctx, args.seed),
                      ThroughputMeter(args.warmup_steps, sync=lambda: synchronize(device)),
                      rank=rank, world_size=world_size, checkpoint_path=args.output_dir / "checkpoint.pth",
                      all_reduce_mean=all_reduce_mean, gather=gather)
    torch.manual_seed(args.seed + 1000 * (rank + 1))  # dropout: different on each rank
    if args.resume and trainer.checkpoint_path.exists():
        trainer.resume()  # restores every RNG state too
        if rank == 0:
            print(f"Resuming from {trainer.checkpoint_path} at step {trainer.step}.")
    return trainer


def finish_run(trainer: Trainer, args: argparse.Namespace, device: torch.device) -> dict:
    """Print the throughput report and write losses.json, loss.png and (if asked) --metrics-json."""
    report = throughput_report(trainer.meter, trainer.cfg, device, precision_of(args, device))
    report["tokens_per_step"] = trainer.tokens_per_step
    if trainer.rank != 0:
        return report
    print(format_report(report))
    write_json_atomic({"train_losses": trainer.train_losses, "val_losses": trainer.val_losses},
                      args.output_dir / "losses.json")
    if args.metrics_json is not None:
        write_json_atomic(report, args.metrics_json)
    plot_step_losses(trainer.train_losses, trainer.val_losses, args.output_dir / "loss.png")
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def precision_of(args: argparse.Namespace, device: torch.device) -> str:
    return precision_name(device, bf16=args.bf16 or args.pure_bf16, tf32=args.tf32)
