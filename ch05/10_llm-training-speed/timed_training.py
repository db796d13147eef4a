"""The course's `train_model_simple_with_timing` (the chapter's loop with a tokens/s meter) and data loaders.

The loop itself is the chapter's `train_model_simple` (same batches, evaluations and
samples, resumable); this module only times it and prints the course's progress line

    Ep 1, Step 000015, Train: 6.201, Val: 6.152, Step tok/sec: 12545, Avg tok/sec: 12545

"Step tok/sec" covers the steps since the previous line, "Avg tok/sec" all steps so far.
Both come from `ThroughputMeter`: synchronized timers, the first `warmup_steps` steps
and every step that also evaluated or generated a sample left out (the course's meter
instead skips only the first interval and counts the evaluation time).

The data loaders are the chapter's `create_dataloader_v1` with the course's changes for
01 (pinned memory) and 02 (a `DistributedSampler` that gives every rank its own batches).
"""

import torch
import torch.nn as nn
from previous_chapters import GPTDatasetV1, TrainProgress, get_tokenizer, train_model_simple
from speed_utils import ThroughputMeter, synchronize
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


class _StopTraining(Exception):
    """Raised from the step callback to leave the chapter's loop early (a signal arrived)."""


def train_model_simple_with_timing(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq,
                                   eval_iter, start_context, tokenizer, *, warmup_steps: int = 1,
                                   progress: TrainProgress | None = None, max_steps: int | None = None,
                                   on_step=None, should_stop=None, meter: ThroughputMeter | None = None,
                                   progress_bar: bool = False, print_fn=print, is_main_process: bool = True,
                                   world_size: int = 1):
    """Train as the chapter does and print the course's tokens/s lines; returns
    (train_losses, val_losses, track_tokens_seen), as the course's function does.

    Keyword-only extras: `progress`/`max_steps`/`on_step` as in `train_model_simple`
    (resuming, early stop, checkpoints); `should_stop()` is asked after every step and
    ends the run early when it returns True; `meter` lets the caller read the figures
    afterwards; `is_main_process=False` silences the printing (DDP ranks other than 0);
    `world_size` ranks that each train on batches like this one's count as that many
    times the tokens. A `DistributedDataParallel` model and a `DistributedSampler` work.
    """
    progress = progress if progress is not None else TrainProgress()
    sampler = getattr(train_loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):  # a new shuffle order for every epoch, the same on all ranks
        sampler.set_epoch(progress.epoch)
    if isinstance(model, DistributedDataParallel):
        model = DDPChapterView(model)
    timer = _StepTimer(progress, meter or ThroughputMeter(warmup_steps, sync=lambda: synchronize(device)), device,
                       eval_freq, print_fn if is_main_process else None, world_size, sampler, on_step, should_stop)
    timer.meter.start()
    try:
        train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs=num_epochs,
                           eval_freq=eval_freq, eval_iter=eval_iter, start_context=start_context,
                           tokenizer=tokenizer, progress=progress, max_steps=max_steps, on_step=timer.step_done,
                           print_fn=timer.log, progress_bar=progress_bar)
    except _StopTraining:
        pass
    return progress.train_losses, progress.val_losses, progress.track_tokens_seen


class _StepTimer:
    """The hooks `train_model_simple` calls: after every step (tick the meter) and to print."""

    def __init__(self, progress: TrainProgress, meter: ThroughputMeter, device: torch.device, eval_freq: int,
                 print_fn, world_size: int, sampler, on_step, should_stop):
        self.progress, self.meter, self.device, self.eval_freq = progress, meter, device, eval_freq
        self.print_fn, self.world_size, self.sampler = print_fn, world_size, sampler
        self.on_step, self.should_stop = on_step, should_stop
        self.printed_evaluations = len(progress.train_losses)
        self.tokens_seen = progress.tokens_seen
        self.last_tokens, self.last_seconds = 0, 0.0

    def log(self, line: str) -> None:
        """The chapter's loop prints evaluations and samples; evaluations get the course's format."""
        progress, meter = self.progress, self.meter
        if self.print_fn is None:
            return
        if len(progress.train_losses) == self.printed_evaluations:  # a generated sample
            self.print_fn(line)
            return
        seconds = meter.measured_seconds - self.last_seconds
        step_tps = (meter.measured_tokens - self.last_tokens) / seconds if seconds > 0 else 0
        self.last_tokens, self.last_seconds = meter.measured_tokens, meter.measured_seconds
        self.printed_evaluations = len(progress.train_losses)
        self.print_fn(f"Ep {progress.epoch + 1}, Step {progress.global_step:06d}, "
                      f"Train: {progress.train_losses[-1]:.3f}, Val: {progress.val_losses[-1]:.3f}, "
                      f"Step tok/sec: {round(step_tps)}, Avg tok/sec: {round(meter.tokens_per_s or 0)}")

    def step_done(self, progress: TrainProgress) -> None:
        """Stop the clock (leaving out steps that evaluated or sampled), then restart it."""
        evaluated = progress.global_step % self.eval_freq == 0
        sampled = progress.batches_done == 0  # an epoch ended and a sample was generated
        self.meter.stop((progress.tokens_seen - self.tokens_seen) * self.world_size, discard=evaluated or sampled)
        self.tokens_seen = progress.tokens_seen
        if sampled and self.print_fn is not None:
            print_memory(self.device, self.print_fn)
        if sampled and isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(progress.epoch)
        if self.on_step is not None:
            self.on_step(progress)
        if self.should_stop is not None and self.should_stop():
            raise _StopTraining
        self.meter.start()


def print_memory(device: torch.device, print_fn=print) -> None:
    """The course's memory lines after each epoch (CUDA only: what the caching allocator holds)."""
    if device.type == "cuda":
        print_fn(f"\nAllocated memory: {torch.cuda.memory_allocated(device) / 1024**3:.4f} GB")
        print_fn(f"Reserved memory: {torch.cuda.memory_reserved(device) / 1024**3:.4f} GB\n")


class DDPChapterView(nn.Module):
    """A `DistributedDataParallel` model as the chapter's loop expects it: calls go through
    DDP (so gradients are averaged), `pos_emb` is read from the wrapped model (the sample
    after each epoch needs the context length)."""

    def __init__(self, ddp_model: DistributedDataParallel):
        super().__init__()
        self.ddp_model = ddp_model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.ddp_model(idx)

    @property
    def pos_emb(self) -> nn.Embedding:
        return self.ddp_model.module.pos_emb


def create_dataloader(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0, *,
                      pin_memory: bool | None = None, distributed: bool = False,
                      generator: torch.Generator | None = None) -> DataLoader:
    """The chapter's `create_dataloader_v1` with the course's options for 01 and 02.

    `pin_memory` (default: when CUDA is available, as the course's 01 asks for it on a GPU)
    lets batches be copied to the GPU without blocking. `distributed=True` gives every
    DDP rank its own share of the windows through a `DistributedSampler` (which shuffles,
    so `shuffle` then only decides whether the sampler does).
    """
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    if distributed:
        return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                          pin_memory=pin, sampler=DistributedSampler(dataset, shuffle=shuffle))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin, generator=generator)
