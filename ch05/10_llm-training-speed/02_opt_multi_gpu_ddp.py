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
"""

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from ch05_utils import get_device
from speed_train import (
    add_optimization_arguments,
    check_optimization_arguments,
    enable_device_settings,
    finish_run,
    make_trainer,
)
from speed_utils import (
    add_common_arguments,
    check_common_arguments,
    default_text_path,
    device_name,
    model_config,
    write_token_file,
)
from torch.nn.parallel import DistributedDataParallel as DDP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser)
    add_optimization_arguments(parser)
    return parser


def rank_device(args: argparse.Namespace, local_rank: int) -> torch.device:
    """One GPU per process (cuda:LOCAL_RANK), or the CPU."""
    device = get_device(args.device)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("error: start this script with torchrun, e.g. "
              "`torchrun --nproc_per_node=2 02_opt_multi_gpu_ddp.py --device cpu`.", file=sys.stderr)
        return 2
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        check_common_arguments(args)
        device = rank_device(args, local_rank)
        check_optimization_arguments(args, device)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    enable_device_settings(args, device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    try:
        return run(args, device, rank, world_size)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> int:
    cfg = model_config(args)
    token_path = args.output_dir / "tokens.npy"
    failed = torch.zeros(1, device=device)  # NCCL communicates GPU tensors, gloo CPU tensors
    if rank == 0:  # one process tokenizes; the others wait, then memory-map the file
        try:
            write_token_file(args.text_file or default_text_path(), token_path)
        except (ValueError, FileNotFoundError, ConnectionError) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    dist.broadcast(failed, src=0)
    if failed.item():
        return 2
    try:
        wrap = (lambda m: DDP(m, device_ids=[device.index])) if device.type == "cuda" else DDP
        trainer = make_trainer(args, cfg, device, token_path, rank=rank, world_size=world_size, wrap=wrap,
                               all_reduce_mean=all_reduce_mean, gather=gather_objects)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"DDP over {world_size} processes on {device_name(device)}: {trainer.total_steps} steps of "
              f"{trainer.tokens_per_step:,} tokens ({args.batch_size} windows x {args.grad_accum_steps} "
              f"micro-batches x {world_size} ranks).")
    trainer.run(progress_bar=not args.no_progress)
    finish_run(trainer, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
