"""Learning-rate warm-up, cosine decay and gradient clipping for the chapter's training loop.

Three small changes that make pretraining steadier (appendix D of the course):

* **Linear warm-up**: start at a small `initial_lr` and raise it linearly to `peak_lr`
  over `warmup_steps`. At the start the weights are random and the gradients large and
  noisy; AdamW's running statistics are not settled yet either. Small first steps
  keep the model from being thrown far off by them.
* **Cosine decay**: after warm-up, lower the learning rate along half a cosine from
  `peak_lr` to `min_lr`, reached at `total_steps`. Smaller steps late in training let
  the weights settle into a minimum instead of bouncing around it.
* **Gradient clipping by global norm**: if the L2 norm of all gradients together
  exceeds `max_grad_norm`, scale every gradient down by the same factor. The update's
  direction is kept, only a rare huge step is shortened.

Shared file. The canonical copy is ch05/04_learning_rate_schedulers/lr_schedule.py;
`make sync` (scripts/sync_shared_code.py) overwrites the copies in the other ch05
folders with it, so edit the canonical file, never a copy.
"""

import math

import torch
from ch05_utils import calc_loss_batch, evaluate_model, generate_and_print_sample


def lr_at_step(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0,
               initial_lr: float = 0.0, min_lr: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (counted from 0) of a `total_steps` run.

    Steps 0 .. warmup_steps - 1 rise linearly from `initial_lr` (at step 0) towards
    `peak_lr`; from step `warmup_steps` on, the rate follows half a cosine from
    `peak_lr` down to `min_lr`, which it reaches at step `total_steps` (so the last
    step of a run, `total_steps - 1`, is just above `min_lr`, as in the course).
    Steps past `total_steps` stay at `min_lr`.

    With `warmup_steps=0` there is no warm-up; with `min_lr == peak_lr` there is no
    decay, and the rate is constant like in `train_model_simple`.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be an int between 0 and total_steps ({total_steps}), got {warmup_steps!r}; "
            "warm-up is usually 1-20% of the run."
        )
    for name, value in (("peak_lr", peak_lr), ("initial_lr", initial_lr), ("min_lr", min_lr)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if peak_lr == 0:
        raise ValueError("peak_lr must be > 0: with a peak of 0 the model never changes.")
    if initial_lr > peak_lr or min_lr > peak_lr:
        raise ValueError(
            f"initial_lr ({initial_lr}) and min_lr ({min_lr}) must not exceed peak_lr ({peak_lr}): "
            "warm-up rises to the peak and decay falls from it."
        )

    if step < warmup_steps:
        return initial_lr + (peak_lr - initial_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # 0 at the peak, 1 at the end
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (what a scheduler does each step)."""
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def clip_gradients(model: torch.nn.Module, max_grad_norm: float | None) -> torch.Tensor:
    """Return the global L2 norm of all gradients, measured *before* clipping, and clip them.

    The global norm treats every gradient of the model as one long vector. If it is above
    `max_grad_norm`, all gradients are multiplied by `max_grad_norm / norm`, so the vector
    keeps its direction and gets length `max_grad_norm`. With `max_grad_norm=None` the
    gradients are only measured. The norm is returned as a tensor, so that callers on a
    GPU decide themselves when to wait for it with `.item()`.
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}")
    limit = float("inf") if max_grad_norm is None else max_grad_norm
    return torch.nn.utils.clip_grad_norm_(model.parameters(), limit)


def train_model(model: torch.nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
                device: torch.device | str, n_epochs: int, eval_freq: int, eval_iter: int,
                start_context: str | None, tokenizer, warmup_steps: int, initial_lr: float = 3e-05,
                min_lr: float = 1e-6, *, max_grad_norm: float | None = 1.0,
                track_grad_norms: list | None = None, print_fn=print) -> tuple[list, list, list, list]:
    """The chapter's training loop with linear warm-up, cosine decay and gradient clipping.

    The signature up to `min_lr` is the book's (appendix D); what this version adds
    (`max_grad_norm`, `track_grad_norms`, `print_fn`) is keyword-only, and the defaults
    give the book's behaviour.

    The peak learning rate is the one the optimizer was created with. The run is
    `len(train_loader) * n_epochs` steps long; `lr_at_step` gives the rate of each step.
    Gradients are clipped to `max_grad_norm` from the end of warm-up on, as in the
    course: during warm-up the small learning rate already keeps steps short, and the
    large early gradients then pass unchanged into AdamW's running statistics
    (`max_grad_norm=None` turns clipping off).

    Returns (train_losses, val_losses, track_tokens_seen, track_lrs): the first three as
    in `train_model_simple`, plus the learning rate of every step. If `track_grad_norms`
    is a list, the global gradient norm of every step (before clipping) is appended to
    it. `start_context=None` skips the sample printed after each epoch.

    With `warmup_steps=0`, `min_lr` equal to the optimizer's rate and `max_grad_norm=None`
    this computes exactly what `train_model_simple` computes.
    """
    train_losses, val_losses, track_tokens_seen, track_lrs = [], [], [], []
    tokens_seen, global_step = 0, -1
    peak_lr = optimizer.param_groups[0]["lr"]
    total_steps = len(train_loader) * n_epochs
    if total_steps == 0:
        raise ValueError("The training loader is empty (or n_epochs is 0): there is nothing to train on.")
    lr_at_step(0, total_steps, peak_lr, warmup_steps, initial_lr, min_lr)  # check the arguments up front

    for epoch in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            global_step += 1
            lr = lr_at_step(global_step, total_steps, peak_lr, warmup_steps, initial_lr, min_lr)
            apply_lr(optimizer, lr)
            track_lrs.append(lr)

            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            clip_now = max_grad_norm is not None and global_step >= warmup_steps
            grad_norm = clip_gradients(model, max_grad_norm if clip_now else None)
            if track_grad_norms is not None:
                track_grad_norms.append(grad_norm.item())
            optimizer.step()
            tokens_seen += input_batch.numel()

            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print_fn(f"Ep {epoch + 1} (Iter {global_step:06d}): "
                         f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        if start_context is not None:
            generate_and_print_sample(model, tokenizer, device, start_context, print_fn=print_fn)

    return train_losses, val_losses, track_tokens_seen, track_lrs
