"""The course's three training-speed scripts, called the course's way, in this folder.

The course's `00_orig.py`, `01_opt_single_gpu.py` and `02_opt_multi_gpu_ddp.py` define
the chapter's classes and functions, `train_model_simple_with_timing`, the optimized
model of 01/02 (`PyTorchMultiHeadAttention`, ...) and `main(gpt_config, settings)`
(`main(gpt_config, settings, rank, world_size)` in 02). These tests make those calls with
the course's argument order and check the course's documented results; the course's
signatures are written out below.
"""

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from previous_chapters import GPTModel as ChapterGPTModel
from speed_train import build_model

FOLDER = Path(__file__).resolve().parent.parent
VERDICT = Path(os.environ.get("CH05_DATA_DIR", FOLDER.parent.parent.parent / "shared" / "data")) / "the-verdict.txt"
TINY = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
        "qkv_bias": False}
SETTINGS = {"learning_rate": 5e-4, "num_epochs": 1, "batch_size": 2, "weight_decay": 0.1}
R = inspect.Parameter.empty  # "required" in the tables below

CHAPTER_API = {
    "GPTDatasetV1": [("txt", R), ("tokenizer", R), ("max_length", R), ("stride", R)],
    "generate_text_simple": [("model", R), ("idx", R), ("max_new_tokens", R), ("context_size", R)],
    "text_to_token_ids": [("text", R), ("tokenizer", R)],
    "token_ids_to_text": [("token_ids", R), ("tokenizer", R)],
    "calc_loss_batch": [("input_batch", R), ("target_batch", R), ("model", R), ("device", R)],
    "calc_loss_loader": [("data_loader", R), ("model", R), ("device", R), ("num_batches", None)],
    "evaluate_model": [("model", R), ("train_loader", R), ("val_loader", R), ("device", R), ("eval_iter", R)],
    "plot_losses": [("epochs_seen", R), ("tokens_seen", R), ("train_losses", R), ("val_losses", R)],
}
LOADER = [("txt", R), ("batch_size", 4), ("max_length", 256), ("stride", 128), ("shuffle", True),
          ("drop_last", True), ("num_workers", 0)]
TIMED = [("model", R), ("train_loader", R), ("val_loader", R), ("optimizer", R), ("device", R), ("num_epochs", R),
         ("eval_freq", R), ("eval_iter", R), ("start_context", R), ("tokenizer", R)]
SINGLE_PROCESS_API = {
    **CHAPTER_API,
    "create_dataloader_v1": LOADER,
    "FeedForward": [("cfg", R)],
    "TransformerBlock": [("cfg", R)],
    "GPTModel": [("cfg", R)],
    "generate_and_print_sample": [("model", R), ("tokenizer", R), ("device", R), ("start_context", R)],
    "train_model_simple_with_timing": TIMED,
    "main": [("gpt_config", R), ("settings", R)],
}
COURSE_API = {
    "00_orig.py": {**SINGLE_PROCESS_API, "LayerNorm": [("emb_dim", R)], "GELU": [],
                   "MultiHeadAttention": [("d_in", R), ("d_out", R), ("context_length", R), ("dropout", R),
                                          ("num_heads", R), ("qkv_bias", False)]},
    "01_opt_single_gpu.py": {**SINGLE_PROCESS_API,
                             "PyTorchMultiHeadAttention": [("d_in", R), ("d_out", R), ("num_heads", R),
                                                           ("dropout", 0.0), ("qkv_bias", False)]},
    "02_opt_multi_gpu_ddp.py": {
        **CHAPTER_API, "FeedForward": [("cfg", R)], "TransformerBlock": [("cfg", R)], "GPTModel": [("cfg", R)],
        "PyTorchMultiHeadAttention": [("d_in", R), ("d_out", R), ("num_heads", R), ("dropout", 0.0),
                                      ("qkv_bias", False)],
        "ddp_setup": [("rank", R), ("world_size", R)],
        "create_dataloader_v1": [p for p in LOADER if p[0] != "shuffle"],
        "generate_and_print_sample": [("model", R), ("device", R), ("start_context", R)],
        "train_model_simple_with_timing": TIMED[:-1],
        "main": [("gpt_config", R), ("settings", R), ("rank", R), ("world_size", R)],
    },
}


def load_script(filename: str):
    spec = importlib.util.spec_from_file_location("book_api_" + filename[:2], FOLDER / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in COURSE_API}


def positional_then_keyword_only(obj, expected: list[tuple[str, object]]) -> None:
    """The course's parameters come first, in its order and with its defaults; ours are keyword-only."""
    if inspect.isclass(obj) and not expected and "__init__" not in vars(obj):
        obj()  # a module without a constructor of its own (the course's GELU)
        return
    params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    head = [(p.name, p.default) for p in params[:len(expected)]]
    assert head == expected, f"{obj.__qualname__}: {head} != {expected}"
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:len(expected)])
    extras = params[len(expected):]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in extras), f"{obj.__qualname__}: {extras}"


@pytest.mark.parametrize("script", COURSE_API)
def test_every_course_name_exists_with_the_course_signature(scripts, script):
    for name, expected in COURSE_API[script].items():
        positional_then_keyword_only(getattr(scripts[script], name), expected)


def test_00_main_returns_the_course_results_and_prints_its_lines(scripts, capsys, tmp_path):
    orig = scripts["00_orig.py"]
    text = VERDICT.read_text(encoding="utf-8")[:9000]  # 2 evaluations: small enough for 2 CPU cores
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    train_losses, val_losses, tokens_seen, model = orig.main(TINY, SETTINGS, text_file=tmp_path / "book.txt")
    out = capsys.readouterr().out
    # The course evaluates at steps 0, 15, 30, ... of one pass over the training windows.
    loader = orig.create_dataloader_v1(text[:int(0.9 * len(text))], batch_size=2, max_length=32, stride=32)
    steps = range(0, len(loader), 15)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == len(steps)
    assert tokens_seen == [(s + 1) * 2 * 32 for s in steps]
    lines = re.findall(r"^Ep 1, Step (\d{6}), Train: \d+\.\d{3}, Val: \d+\.\d{3}, Step tok/sec: \d+, "
                       r"Avg tok/sec: \d+$", out, flags=re.M)
    assert [int(s) for s in lines] == list(steps)
    assert "Every effort moves you" in out  # the sample after the epoch
    assert isinstance(model, ChapterGPTModel) and train_losses[-1] < train_losses[0]
    # The course's __main__: plot against a linspace of epochs and save the figure.
    orig.plot_losses(torch.linspace(0, SETTINGS["num_epochs"], len(train_losses)), tokens_seen, train_losses,
                     val_losses)
    plt.savefig(tmp_path / "loss.pdf")
    plt.close("all")
    assert (tmp_path / "loss.pdf").stat().st_size > 0


def test_00_timing_loop_with_the_course_arguments(scripts, capsys):
    orig = scripts["00_orig.py"]
    text = VERDICT.read_text(encoding="utf-8")[:3500]
    torch.manual_seed(123)
    model = orig.GPTModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    train_loader = orig.create_dataloader_v1(text[:3000], batch_size=2, max_length=32, stride=32)
    val_loader = orig.create_dataloader_v1(text[3000:], batch_size=2, max_length=32, stride=32, shuffle=False,
                                           drop_last=False)
    result = orig.train_model_simple_with_timing(model, train_loader, val_loader, optimizer, torch.device("cpu"),
                                                 2, 5, 1, "Every effort moves you", orig.get_tokenizer())
    train_losses, val_losses, track_tokens = result
    steps = range(0, 2 * len(train_loader), 5)
    assert len(train_losses) == len(val_losses) == len(steps)
    assert track_tokens == [(s + 1) * 64 for s in steps]
    assert capsys.readouterr().out.count("Every effort moves you") == 2  # one sample per epoch


def test_01_model_has_the_course_parameters_and_the_chapter_computation(scripts):
    opt = scripts["01_opt_single_gpu.py"]
    torch.manual_seed(0)
    course = opt.GPTModel(TINY).eval()
    expected = {"tok_emb.weight", "pos_emb.weight", "final_norm.weight", "final_norm.bias", "out_head.weight"}
    for i in range(TINY["n_layers"]):
        for part in ("att.qkv.weight", "att.proj.weight", "att.proj.bias", "ff.layers.0.weight", "ff.layers.0.bias",
                     "ff.layers.2.weight", "ff.layers.2.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                     "norm2.bias"):
            expected.add(f"trf_blocks.{i}.{part}")
    assert set(course.state_dict()) == expected
    assert course.trf_blocks[0].att.qkv.weight.shape == (3 * 32, 32)

    from pytorch_gpt import state_dict_from_chapter
    chapter = ChapterGPTModel(TINY).eval()
    course.load_state_dict(state_dict_from_chapter(chapter.state_dict()))  # strict
    torch.manual_seed(0)
    flags_model = build_model(TINY, sdpa=True, native_ops=True).eval()
    flags_model.load_state_dict(chapter.state_dict())
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(course(idx), chapter(idx), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flags_model(idx), chapter(idx), rtol=1e-5, atol=1e-5)


def test_01_main_runs_the_course_optimizations_and_returns_the_course_results(scripts, capsys):
    opt = scripts["01_opt_single_gpu.py"]
    cfg = {**TINY, "vocab_size": 50304}  # the course's padded vocabulary
    train_losses, val_losses, tokens_seen, model = opt.main(cfg, SETTINGS, text_file=VERDICT, device="cpu",
                                                            max_steps=20, compile_backend="aot_eager")
    out = capsys.readouterr().out
    assert "Optimizations: --fused-adamw --pure-bf16 --compile." in out
    assert len(train_losses) == len(val_losses) == 2 and tokens_seen == [10 * 64, 20 * 64]
    assert all(torch.isfinite(torch.tensor(train_losses + val_losses)))
    assert isinstance(model, opt.GPTModel) and model.out_head.weight.dtype == torch.bfloat16
    assert model.out_head.weight.shape[0] == 50304


def test_01_loader_pins_memory_only_where_a_gpu_can_use_it(scripts):
    loader = scripts["01_opt_single_gpu.py"].create_dataloader_v1(VERDICT.read_text()[:3000], 2, 32, 32)
    assert loader.pin_memory == torch.cuda.is_available()


DDP_MAIN = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("ddp_book", sys.argv[1])
ddp = importlib.util.module_from_spec(spec); spec.loader.exec_module(ddp)
cfg, settings = {**json.loads(sys.argv[3]), "vocab_size": 50304}, json.loads(sys.argv[4])
# As the course's __main__: the rank from LOCAL_RANK, the world size from WORLD_SIZE.
rank, world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
result = ddp.main(cfg, settings, rank, world_size, text_file=sys.argv[2], device="cpu", max_steps=10,
                  compile_backend="aot_eager")
if rank == 0:
    json.dump(result[:3], open(sys.argv[5], "w"))
"""

DDP_LOOP = """
import importlib.util, json, os, sys
import torch
from previous_chapters import GPTModel
spec = importlib.util.spec_from_file_location("ddp_book", sys.argv[1])
ddp = importlib.util.module_from_spec(spec); spec.loader.exec_module(ddp)
rank, world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
ddp.ddp_setup(rank, world_size)
text = open(sys.argv[2], encoding="utf-8").read()[:6000]
torch.manual_seed(123)
model = torch.nn.parallel.DistributedDataParallel(GPTModel(json.loads(sys.argv[3])))
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
train_loader = ddp.create_dataloader_v1(text[:5000], batch_size=2, max_length=32, stride=32)
val_loader = ddp.create_dataloader_v1(text[5000:], batch_size=2, max_length=32, stride=32, drop_last=False)
losses = ddp.train_model_simple_with_timing(model, train_loader, val_loader, optimizer, torch.device("cpu"), 1, 5, 1,
                                            "Every effort moves you")
ddp.generate_and_print_sample(model, torch.device("cpu"), "Every effort")
ddp.dist.destroy_process_group()
if rank == 0:
    json.dump({"timed": losses, "batches": len(train_loader)}, open(sys.argv[5], "w"))
"""


def torchrun_course_script(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess, object]:
    """Run `source` in 2 CPU processes under torchrun; returns the result and what rank 0 wrote."""
    script = tmp_path / "course_ddp.py"
    script.write_text(textwrap.dedent(source))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(FOLDER / "02_opt_multi_gpu_ddp.py"), str(VERDICT), json.dumps(TINY), json.dumps(SETTINGS),
         str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(FOLDER)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((tmp_path / "result.json").read_text())


def test_02_main_under_torchrun_returns_the_course_results(tmp_path):
    result, (train_losses, val_losses, tokens_seen) = torchrun_course_script(tmp_path, DDP_MAIN)
    assert len(train_losses) == len(val_losses) == 2 and tokens_seen == [5 * 64, 10 * 64]  # tokens of this rank
    assert "DDP over 2 processes" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["course_ddp.py", "result.json"]  # main wrote no files


def test_02_ddp_loop_loader_and_sample_under_torchrun(tmp_path):
    result, out = torchrun_course_script(tmp_path, DDP_LOOP)
    steps = range(0, out["batches"], 5)  # each rank's loader holds half the windows
    train_losses, val_losses, track_tokens = out["timed"]
    assert len(train_losses) == len(val_losses) == len(steps) and track_tokens == [(s + 1) * 64 for s in steps]
    assert result.stdout.count("Ep 1, Step 000000") == 1  # rank 0 prints, the other rank does not
