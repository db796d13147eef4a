"""The optimized training of `01_opt_single_gpu.py` on several GPUs (or CPU processes) with DDP.

    torchrun --nproc_per_node=2 02_opt_multi_gpu_ddp.py --device cpu --model tiny --max-steps 10
    torchrun --nproc_per_node=8 02_opt_multi_gpu_ddp.py --device cuda --bf16 --sdpa --compile ...

DistributedDataParallel keeps one copy of the model per process ("rank"). Every rank
computes gradients on its own micro-batches; during the backward pass of the last
micro-batch of a step, DDP averages the gradients of all ranks (an all-reduce over NCCL
on GPUs, gloo on CPUs), so every rank applies the same AdamW update and the copies stay
identical. Each rank reads only its own part of every global batch from the
memory-mapped token file: with W ranks and A accumulation steps, step s of rank r uses
micro-batches r*A .. r*A+A-1 of the global batch. One process with W*A accumulation
steps therefore computes the same losses (the tests check this).

Rank 0 prints, writes the token file, the checkpoint (atomically, with every rank's RNG
state), `losses.json` and `loss.png`; `--resume` needs the same number of processes.
Ctrl-C or SIGTERM (torchrun forwards it to the ranks) stops all ranks after the same step
and saves. Each rank also dies with its parent: if torchrun itself is killed, the ranks
get SIGTERM from the kernel, save and exit, instead of training on as orphans.

The course's names work here too: `ddp_setup(rank, world_size)`, the DDP versions of
`create_dataloader_v1`, `generate_and_print_sample` and `train_model_simple_with_timing`,
and `main(gpt_config, settings, rank, world_size)`, which runs the course's optimized
model through the same `run` as the command line.
"""

import argparse
import ctypes
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from ch05_utils import get_device
from previous_chapters import (  # noqa: F401  (the course's 02_opt_multi_gpu_ddp.py defines these names)
    GPTDatasetV1,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    generate_text_simple,
    get_tokenizer,
    plot_losses,
    text_to_token_ids,
    token_ids_to_text,
)
from previous_chapters import generate_and_print_sample as chapter_sample
from pytorch_gpt import FeedForward, GPTModel, PyTorchMultiHeadAttention, TransformerBlock  # noqa: F401
from speed_settings import (
    TrainSettings,
    add_common_arguments,
    add_optimization_arguments,
    check_device_support,
    check_output_dir,
    course_run_settings,
    model_config,
    settings_from_args,
)
from speed_train import (
    StopRequest,
    Trainer,
    TrainingDiverged,
    course_results,
    enable_device_settings,
    finish_run,
    make_trainer,
)
from speed_utils import OutputLock, book_text_path, default_text_path, device_name, write_token_file
from timed_training import create_dataloader
from timed_training import train_model_simple_with_timing as timed_loop
from torch.nn.parallel import DistributedDataParallel as DDP

# The course's settings for its DDP run (its `main` gets them as arguments).
GPT_CONFIG_124M = {"vocab_size": 50304, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
                   "drop_rate": 0.1, "qkv_bias": False}
OTHER_SETTINGS = {"learning_rate": 5e-4, "num_epochs": 50, "batch_size": 32, "weight_decay": 0.1}
PR_SET_PDEATHSIG = 1  # prctl option (Linux): the signal this process gets when its parent dies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    add_optimization_arguments(parser)
    return parser


def die_with_parent() -> None:
    """Have the kernel send this rank SIGTERM when its parent (torchrun) dies, even by SIGKILL.

    torchrun starts every rank in a session of its own, so a killed torchrun would leave
    them training (or waiting in a collective) forever. On Linux `prctl(PR_SET_PDEATHSIG)`
    asks the kernel for a signal; elsewhere a thread watches the parent's process id.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl failed")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the kernel was asked to tell us
        os.kill(os.getpid(), signal.SIGTERM)


def rank_device(settings: TrainSettings, local_rank: int) -> torch.device:
    """One GPU per process (cuda:LOCAL_RANK), or the CPU."""
    device = get_device(settings.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"Process {local_rank} has no GPU of its own (only {torch.cuda.device_count()} "
                             "visible); start at most that many processes per node.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"DDP here runs on CUDA (NCCL) or CPU (gloo), not {device.type}.")
    return device


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def gather_objects(obj) -> list:
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


class RankError(ValueError):
    """A failure every rank knows about (so all of them stop), with the exit code for the command line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def cli(argv: list[str] | None = None) -> int:
    """The command line: `torchrun --nproc_per_node=N 02_opt_multi_gpu_ddp.py [flags]`."""
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("error: start this script with torchrun, e.g. "
              "`torchrun --nproc_per_node=2 02_opt_multi_gpu_ddp.py --device cpu`.", file=sys.stderr)
        return 2
    die_with_parent()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        settings = settings_from_args(args)
        device = rank_device(settings, local_rank)
        check_device_support(settings, device)
        check_output_dir(settings)  # every rank: they all fail alike instead of waiting for rank 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    enable_device_settings(settings)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    try:
        run(settings, model_config(settings), device, rank, world_size)
    except RankError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        dist.destroy_process_group()
    return 0


def run(settings: TrainSettings, cfg: dict, device: torch.device, rank: int, world_size: int,
        model: torch.nn.Module | None = None, token_dir: Path | None = None) -> Trainer:
    """One rank's training and report (the process group is set up); a failure raises `RankError` on every rank."""
    lock = OutputLock(settings.output_dir if rank == 0 else None)  # rank 0 speaks for the run
    try:
        return train_rank(settings, cfg, device, rank, world_size, model, token_dir, lock)
    finally:
        lock.release()


def train_rank(settings: TrainSettings, cfg: dict, device: torch.device, rank: int, world_size: int,
               model: torch.nn.Module | None, token_dir: Path | None, lock: OutputLock) -> Trainer:
    """`run` with the output folder locked by rank 0."""
    token_path = (token_dir or settings.output_dir) / "tokens.npy"
    problem = [None]
    if rank == 0:  # one process locks the folder and tokenizes; the others wait, then memory-map the file
        try:
            lock.acquire()
            write_token_file(settings.text_file or default_text_path(), token_path)
        except (ValueError, FileNotFoundError, ConnectionError) as err:
            problem = [str(err)]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise RankError(problem[0])
    try:
        # The chapter's causal masks are constant buffers: no need for DDP to broadcast them every step.
        device_ids = [device.index] if device.type == "cuda" else None
        wrap = lambda m: DDP(m, device_ids=device_ids, broadcast_buffers=False)  # noqa: E731
        trainer = make_trainer(settings, cfg, device, token_path, rank=rank, world_size=world_size, wrap=wrap,
                               all_reduce_mean=all_reduce_mean, gather=gather_objects, model=model)
    except ValueError as err:
        raise RankError(str(err)) from None
    if rank == 0:
        print(f"DDP over {world_size} processes on {device_name(device)}: {trainer.total_steps} steps of "
              f"{trainer.tokens_per_step:,} tokens ({settings.batch_size} windows x {settings.grad_accum_steps} "
              f"micro-batches x {world_size} ranks).", flush=True)
    try:
        with StopRequest(grace_seconds=60) as stop:
            trainer.run(progress_bar=settings.progress_bar, stop=stop)
    except TrainingDiverged as err:  # the loss is averaged over the ranks: all of them see it
        raise RankError(str(err), exit_code=1) from None
    finish_run(trainer, settings, device)
    return trainer


#####################################
# The course's names
#####################################

def ddp_setup(rank: int, world_size: int, *, backend: str | None = None) -> None:
    """Join the process group as `rank` of `world_size` (one process per GPU, or CPU processes).

    As in the course, MASTER_ADDR/MASTER_PORT default to localhost:12345 unless torchrun set
    them. The backend is NCCL with CUDA GPUs and gloo otherwise (and on Windows).
    """
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "12345")
    if platform.system() == "Windows":
        os.environ["USE_LIBUV"] = "0"  # PyTorch for Windows is built without libuv
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and platform.system() != "Windows" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         drop_last: bool = True, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The course's loader of 02: every rank gets its own windows (a `DistributedSampler`)."""
    return create_dataloader(txt, batch_size, max_length, stride, True, drop_last, num_workers, distributed=True)


def generate_and_print_sample(model: torch.nn.Module, device: torch.device, start_context: str) -> None:
    """The chapter's sample after an epoch, for a model that may be wrapped in DDP."""
    chapter_sample(model.module if isinstance(model, DDP) else model, get_tokenizer(), device, start_context)


def train_model_simple_with_timing(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq,
                                   eval_iter, start_context, **extras):
    """The course's DDP training loop: the chapter's loop with tokens/s counted over all ranks,
    printed by rank 0 only. `extras` are the keyword-only options of the single-process version."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return timed_loop(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                      start_context, get_tokenizer(), is_main_process=rank == 0, world_size=world_size, **extras)


def main(gpt_config: dict, settings: dict, rank: int, world_size: int, *, text_file: str | Path | None = None,
         device: str = "auto", output_dir: str | Path | None = None, max_steps: int | None = None,
         compile_backend: str = "inductor") -> tuple[list, list, list, torch.nn.Module]:
    """The course's entry point for one rank: set up DDP, train the course's optimized
    `GPTModel(gpt_config)` with `settings` (evaluating every 5 steps), clean up.

    Returns (train_losses, val_losses, tokens_seen, model) as 01's `main` does, with the
    tokens this rank has seen. Keyword-only extras as in 01's `main`.
    """
    die_with_parent()
    ddp_setup(rank, world_size)
    try:
        device_ = rank_device(TrainSettings(device=device), rank)
        run_settings = course_run_settings(
            gpt_config, settings, eval_freq=5, on_cuda=device_.type == "cuda", text_file=book_text_path(text_file),
            device=device, output_dir=None if output_dir is None else Path(output_dir), max_steps=max_steps,
            compile_backend=compile_backend, progress_bar=False)
        check_output_dir(run_settings)
        torch.manual_seed(run_settings.seed)
        token_dir = None if output_dir else Path(tempfile.gettempdir()) / f"ch05-speed-tokens-{os.getppid()}"
        trainer = run(run_settings, dict(gpt_config), device_, rank, world_size, model=GPTModel(gpt_config),
                      token_dir=token_dir)
        dist.barrier()  # every rank is done with the token file
        if rank == 0 and token_dir is not None:
            (token_dir / "tokens.npy").unlink(missing_ok=True)
            token_dir.rmdir()
    finally:
        dist.destroy_process_group()
    return course_results(trainer)


if __name__ == "__main__":
    sys.exit(cli())
