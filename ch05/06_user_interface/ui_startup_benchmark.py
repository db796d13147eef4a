"""How long does app_own.py take to get its model ready? Reading a checkpoint two ways.

    python ui_startup_benchmark.py                 # 124M shape: a 1.9 GB checkpoint like gpt_train.py's
    python ui_startup_benchmark.py --model tiny

Writes a checkpoint shaped like the one `gpt_train.py` saves (model weights plus AdamW's
two moment tensors per weight, about three times the weights) into a temporary folder,
then loads the model from it, alternating between:
  - reading the whole file (`torch.load(..., weights_only=True)`, the optimizer state too),
  - what app_own.py does (`ui_chat_core.load_model_file`): the file is memory-mapped and
    only the model's tensors are read.
It then times the compiled decoding step's first use (`warm_up`), which app_own.py also
does before it serves. The file is in the page cache after being written, so these are
warm-cache times; from a cold disk both reads take longer, the full read most.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from ch05_utils import save_checkpoint_atomic
from gpt_kv_cache import GPTModelKV
from ui_chat_core import load_model_file, make_chat_model, warm_up
from ui_generation_benchmark import BENCHMARK_CONFIGS, build_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BENCHMARK_CONFIGS), default="124M", help="Model shape.")
    parser.add_argument("--repeats", type=int, default=3, help="Loads of each kind (the best counts).")
    return parser


def write_training_checkpoint(path: Path, cfg: dict) -> int:
    """A gpt_train.py-style checkpoint: model, config and an AdamW state (exp_avg, exp_avg_sq)."""
    model = build_model(cfg, 0)
    optimizer_state = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p),
                                     "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(model.parameters())},
                       "param_groups": [{"lr": 4e-4, "params": list(range(len(list(model.parameters()))))}]}
    save_checkpoint_atomic({"model": model.state_dict(), "config": cfg, "optimizer": optimizer_state}, path)
    return path.stat().st_size


def load_whole_file(path: Path) -> GPTModelKV:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = GPTModelKV(checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be at least 1.", file=sys.stderr)
        return 2
    cfg = BENCHMARK_CONFIGS[args.model]
    with tempfile.TemporaryDirectory(prefix="ui_startup_") as folder:
        path = Path(folder) / "checkpoint.pth"
        size = write_training_checkpoint(path, cfg)
        best = {"whole file": float("inf"), "weights only (app_own.py)": float("inf")}
        for _ in range(args.repeats):
            for name, load in (("whole file", load_whole_file), ("weights only (app_own.py)", load_model_file)):
                start = time.perf_counter()
                model = load(path)
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"torch {torch.__version__}, model {args.model}: checkpoint of {size / 1e9:.2f} GB "
              f"(weights + AdamW state), warm page cache, best of {args.repeats}")
        for name, seconds in best.items():
            print(f"load {name:<26} {seconds:6.2f} s")
        chat = make_chat_model(model, "benchmark")
        try:
            start = time.perf_counter()
            warm_up(chat)
            print(f"warm-up, compiling the decoding step: {time.perf_counter() - start:6.2f} s (less when "
                  "torch.compile's on-disk cache holds it from an earlier run; none with CH05_COMPILE=0)")
        finally:
            chat.batcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
