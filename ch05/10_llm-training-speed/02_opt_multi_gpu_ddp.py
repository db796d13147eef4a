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
"""

import argparse
import ctypes
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from ch05_utils import get_device
from speed_settings import (
    TrainSettings,
    add_common_arguments,
    add_optimization_arguments,
    check_device_support,
    check_output_dir,
    model_config,
    settings_from_args,
)
from speed_train import StopRequest, TrainingDiverged, enable_device_settings, finish_run, make_trainer
from speed_utils import default_text_path, device_name, write_token_file
from torch.nn.parallel import DistributedDataParallel as DDP

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


def cli_main(argv: list[str] | None = None) -> int:
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
        return run(settings, model_config(settings), device, rank, world_size)
    finally:
        dist.destroy_process_group()


def run(settings: TrainSettings, cfg: dict, device: torch.device, rank: int, world_size: int,
        model: torch.nn.Module | None = None):
    """One rank's run (the process group is set up): returns 0, or 2 after a clear error on rank 0."""
    token_path = (settings.output_dir or Path(".")) / "tokens.npy"
    failed = torch.zeros(1, device=device)  # NCCL communicates GPU tensors, gloo CPU tensors
    if rank == 0:  # one process tokenizes; the others wait, then memory-map the file
        try:
            write_token_file(settings.text_file or default_text_path(), token_path)
        except (ValueError, FileNotFoundError, ConnectionError) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    dist.broadcast(failed, src=0)
    if failed.item():
        return 2
    try:
        wrap = (lambda m: DDP(m, device_ids=[device.index])) if device.type == "cuda" else DDP
        trainer = make_trainer(settings, cfg, device, token_path, rank=rank, world_size=world_size, wrap=wrap,
                               all_reduce_mean=all_reduce_mean, gather=gather_objects, model=model)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"DDP over {world_size} processes on {device_name(device)}: {trainer.total_steps} steps of "
              f"{trainer.tokens_per_step:,} tokens ({settings.batch_size} windows x {settings.grad_accum_steps} "
              f"micro-batches x {world_size} ranks).", flush=True)
    try:
        with StopRequest(grace_seconds=60) as stop:
            trainer.run(progress_bar=settings.progress_bar, stop=stop)
    except TrainingDiverged as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    finish_run(trainer, settings, device)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
