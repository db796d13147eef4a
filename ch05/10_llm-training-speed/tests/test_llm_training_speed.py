"""Tests of the training-speed folder: accounting, the optimized model, the three scripts, DDP."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from previous_chapters import GPT_CONFIG_124M, GPTModel
from speed_train import build_model, padded_vocab_size
from speed_utils import (
    ThroughputMeter,
    TokenWindows,
    flops_per_token,
    format_report,
    matmul_params,
    mfu,
    peak_flops,
    throughput_report,
)

FOLDER = Path(__file__).resolve().parent.parent
VERDICT = Path(os.environ.get("CH05_DATA_DIR", FOLDER.parent.parent.parent / "shared" / "data")) / "the-verdict.txt"
TINY_ARGS = ["--device", "cpu", "--model", "tiny", "--context-length", "32", "--batch-size", "2",
             "--text-file", str(VERDICT), "--no-progress", "--eval-freq", "2", "--eval-iter", "1",
             "--warmup-steps", "1"]


def load_script(filename: str):
    """Import a script whose name starts with a digit (not importable with `import`)."""
    spec = importlib.util.spec_from_file_location("speed_script_" + filename[:2], FOLDER / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def orig():
    return load_script("00_orig.py")


@pytest.fixture(scope="module")
def opt():
    return load_script("01_opt_single_gpu.py")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


#####################################
# Accounting
#####################################

@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matmul_params_is_every_parameter_but_the_embedding_tables(qkv_bias):
    cfg = {**GPT_CONFIG_124M, "emb_dim": 64, "n_heads": 4, "n_layers": 3, "qkv_bias": qkv_bias, "context_length": 48}
    model = GPTModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    assert matmul_params(cfg) == total - embeddings


def test_flops_per_token_of_the_124m_shape_at_context_1024():
    cfg = {**GPT_CONFIG_124M, "context_length": 1024}
    n = 12 * (4 * 768 * 768 + 768 + 8 * 768 * 768 + 5 * 768 + 4 * 768) + 2 * 768 + 768 * 50257
    # The course's figure for this shape is 163,009,536 parameters; the embedding tables are not in N.
    assert matmul_params(cfg) == n == 163_009_536 - 50257 * 768 - 1024 * 768
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 1024 * 768
    # The attention term grows linearly with the context; 6N does not change.
    half = {**cfg, "context_length": 512}
    assert flops_per_token(cfg) - flops_per_token(half) == 12 * 12 * 512 * 768


def test_meter_excludes_warmup_and_discarded_steps_and_syncs_before_reading_the_clock():
    events = []
    times = iter([0.0, 5.0,   # step 1: warm-up (compilation), 5 s, not counted
                  10.0, 11.0,  # step 2: 1 s
                  20.0, 22.0,  # step 3: evaluation step, discarded
                  30.0, 31.0])  # step 4: 1 s

    def clock():
        events.append("clock")
        return next(times)

    meter = ThroughputMeter(warmup_steps=1, sync=lambda: events.append("sync"), clock=clock)
    assert meter.tokens_per_s is None
    for discard in (False, False, True, False):
        meter.start()
        meter.stop(tokens=100, discard=discard)
    assert events == ["sync", "clock"] * 8
    assert meter.measured_steps == 2 and meter.measured_seconds == 2.0
    assert meter.tokens_per_s == 100.0
    with pytest.raises(RuntimeError, match="without start"):
        meter.stop(tokens=1)


def test_mfu_uses_the_peak_of_the_named_device_and_precision():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert mfu(100_000, 1e9, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(1e14 / 989.4e12)
    assert mfu(100_000, 1e9, "NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(1e14 / 66.9e12)
    assert mfu(100_000, 1e9, "Imaginary Accelerator 9000", "bf16") is None
    assert mfu(100_000, 1e9, "NVIDIA H100 80GB HBM3", "fp8") is None


@pytest.mark.parametrize("name, expected", [("NVIDIA A100-SXM4-80GB", "MFU on NVIDIA A100-SXM4-80GB (bf16): 54.8%"),
                                            ("Imaginary Accelerator 9000", "(bf16): unknown")])
def test_report_with_a_fake_clock_and_a_fake_device_name(monkeypatch, name, expected):
    import speed_utils
    monkeypatch.setattr(speed_utils, "device_name", lambda device: name)
    clock = iter([0.0, 1.0, 1.0, 2.0])  # two steps of 1 s; the first is warm-up
    meter = ThroughputMeter(warmup_steps=1, clock=lambda: next(clock))
    cfg = {**GPT_CONFIG_124M, "context_length": 1024}
    for _ in range(2):
        meter.start()
        meter.stop(tokens=200_000)
    report = throughput_report(meter, cfg, torch.device("cpu"), "bf16")
    assert report["tokens_per_s"] == 200_000
    assert report["model_flops_per_s"] == 200_000 * flops_per_token(cfg)
    assert report["peak_memory_bytes"] > 0
    text = format_report(report)
    assert expected in text
    assert "the first 1 warm-up/compile step(s)" in text


#####################################
# The optimized model and the data
#####################################

def test_every_model_switch_keeps_the_chapters_weights_and_outputs():
    cfg = {**GPT_CONFIG_124M, "context_length": 24, "emb_dim": 48, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}
    torch.manual_seed(1)
    reference = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg["vocab_size"], (2, 24))
    expected = reference(idx)
    for switches in ({"mask_on_the_fly": True}, {"sdpa": True}, {"native_ops": True},
                     {"sdpa": True, "native_ops": True}):
        torch.manual_seed(1)
        model = build_model(cfg, **switches).eval()
        assert model.state_dict().keys() == reference.state_dict().keys()
        torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    padded = build_model(cfg, pad_vocab=True).eval()
    assert padded_vocab_size(50257) == 50304
    assert padded(idx).shape == (2, 24, 50304)


def test_ranks_read_disjoint_parts_that_together_are_the_global_batch():
    tokens = np.arange(1001, dtype=np.uint16)
    windows = TokenWindows(tokens, context_length=10, seed=0)  # 100 windows
    world, accum, micro = 2, 3, 2
    step_inputs = []
    for rank in range(world):
        for a in range(accum):
            x, y = windows.micro_batch(5, rank * accum + a, micro, world * accum)
            assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
            step_inputs.append(x)
    one_process = torch.cat([windows.micro_batch(5, m, micro, world * accum)[0] for m in range(world * accum)])
    assert torch.equal(torch.cat(step_inputs), one_process)
    starts = one_process[:, 0]
    assert len(set(starts.tolist())) == world * accum * micro  # no window twice
    assert all(s % 10 == 0 for s in starts.tolist())  # non-overlapping windows
    with pytest.raises(ValueError, match="fewer than one global batch"):
        windows.micro_batch(0, 0, 101, 1)


#####################################
# The scripts
#####################################

CPU_FLAGS = [[], ["--mask-on-the-fly"], ["--fused-adamw"], ["--bf16"], ["--pure-bf16"], ["--native-ops"], ["--sdpa"],
             ["--pad-vocab"], ["--no-decay-bias-norm"], ["--keep-grad-buffers"], ["--grad-accum-steps", "2"],
             ["--compile", "--compile-backend", "aot_eager", "--sdpa", "--native-ops"]]


@pytest.mark.parametrize("flags", CPU_FLAGS, ids=lambda f: " ".join(f) or "no-flag")
def test_every_cpu_flag_trains_a_few_steps(opt, tmp_path, flags):
    metrics = tmp_path / "metrics.json"
    rc = opt.cli([*TINY_ARGS, "--max-steps", "3", "--output-dir", str(tmp_path), "--metrics-json", str(metrics),
                   *flags])
    assert rc == 0
    losses = read_json(tmp_path / "losses.json")
    assert len(losses["train_losses"]) == 3 and all(math.isfinite(v) for v in losses["train_losses"])
    assert abs(losses["train_losses"][0] - math.log(50257)) < 0.5  # a fresh model guesses uniformly
    report = read_json(metrics)
    assert report["measured_steps"] == 2 and report["tokens_per_s"] > 0
    assert report["precision"] == ("bf16" if {"--bf16", "--pure-bf16"} & set(flags) else "fp32")
    assert (tmp_path / "checkpoint.pth").is_file() and (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("flag", ["--tf32", "--pin-memory"])
def test_cuda_only_flags_are_refused_on_cpu(opt, tmp_path, capsys, flag):
    assert opt.cli([*TINY_ARGS, "--output-dir", str(tmp_path), flag]) == 2
    assert f"{flag} works only with --device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [(["--context-length", "2048"], "--context-length must be between"),
                                          (["--bf16", "--pure-bf16"], "exclude each other"),
                                          (["--batch-size", "100"], "is shorter than one batch of 100 x 32 tokens")])
def test_bad_input_gives_a_clear_error(opt, tmp_path, capsys, bad, message):
    assert opt.cli([*TINY_ARGS, "--output-dir", str(tmp_path), *bad]) == 2
    assert message in capsys.readouterr().err


def test_keeping_gradient_buffers_changes_no_result(opt, tmp_path):
    """Zeroing in place instead of freeing: the same sums, so the same losses and weights."""
    common = [*TINY_ARGS, "--max-steps", "3", "--grad-accum-steps", "2", "--drop-rate", "0.1"]
    assert opt.cli([*common, "--output-dir", str(tmp_path / "freed")]) == 0
    assert opt.cli([*common, "--output-dir", str(tmp_path / "kept"), "--keep-grad-buffers"]) == 0
    freed, kept = (read_json(tmp_path / d / "losses.json") for d in ("freed", "kept"))
    assert kept == freed
    weights = [torch.load(tmp_path / d / "checkpoint.pth", weights_only=True)["model"] for d in ("freed", "kept")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_benchmark_compares_each_row_with_the_matmul_speed_around_it(tmp_path):
    result = subprocess.run(
        [sys.executable, str(FOLDER / "speed_benchmark.py"), "--device", "cpu", "--model", "tiny",
         "--context-length", "32", "--batch-size", "2", "--steps", "1", "--warmup-steps", "1", "--only", "2",
         "--drop-rate", "0", "--text-file", str(VERDICT), "--output-json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_json(tmp_path / "bench.json")["results"]
    assert [r["script"] for r in rows] == ["00_orig.py", "01_opt_single_gpu.py"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["matmul_peaks"]["fp32"] > 0
        share = r["model_flops_per_s"] / r["matmul_peaks"]["fp32"]
        assert f"| {r['label']} | {r['tokens_per_s']:,.0f} |" in result.stdout
        assert f"{share:.0%} of {r['matmul_peaks']['fp32'] / 1e12:.3f} (fp32)" in result.stdout


def test_benchmark_refuses_a_bad_drop_rate():
    result = subprocess.run([sys.executable, str(FOLDER / "speed_benchmark.py"), "--device", "cpu",
                             "--drop-rate", "1.5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--drop-rate must be in [0, 1), got 1.5" in result.stderr


def test_01_resumes_exactly_where_it_stopped(opt, tmp_path):
    common = [*TINY_ARGS, "--drop-rate", "0.1", "--eval-freq", "1"]  # dropout: the RNG state must be restored
    assert opt.cli([*common, "--max-steps", "4", "--output-dir", str(tmp_path / "straight")]) == 0
    assert opt.cli([*common, "--max-steps", "2", "--output-dir", str(tmp_path / "resumed")]) == 0
    assert opt.cli([*common, "--max-steps", "4", "--output-dir", str(tmp_path / "resumed")]) == 2  # no --resume
    assert opt.cli([*common, "--max-steps", "4", "--output-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    straight, resumed = (read_json(tmp_path / d / "losses.json") for d in ("straight", "resumed"))
    assert len(straight["train_losses"]) == 4
    assert resumed["train_losses"] == pytest.approx(straight["train_losses"], rel=1e-6)
    assert [s for s, _ in resumed["val_losses"]] == [s for s, _ in straight["val_losses"]] == [1, 2, 3, 4]
    assert [v for _, v in resumed["val_losses"]] == pytest.approx([v for _, v in straight["val_losses"]], rel=1e-6)


def test_00_trains_reports_and_resumes(orig, tmp_path):
    common = [*TINY_ARGS, "--eval-freq", "2"]  # evaluates at steps 0 and 2
    metrics = tmp_path / "metrics.json"
    assert orig.cli([*common, "--max-steps", "4", "--output-dir", str(tmp_path / "straight"),
                      "--metrics-json", str(metrics)]) == 0
    assert orig.cli([*common, "--max-steps", "2", "--output-dir", str(tmp_path / "resumed")]) == 0
    assert orig.cli([*common, "--max-steps", "4", "--output-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    straight, resumed = (read_json(tmp_path / d / "losses.json") for d in ("straight", "resumed"))
    assert len(straight["val_losses"]) == 2
    assert resumed["val_losses"] == pytest.approx(straight["val_losses"], rel=1e-6)
    report = read_json(metrics)
    assert report["tokens_per_s"] > 0 and report["mfu"] is None  # this CPU is not in the peak table
    # Step 0 is warm-up; step 2 evaluated, so its time is left out; steps 1 and 3 are timed.
    assert (report["measured_steps"], report["other_steps_excluded"]) == (2, 1)


def test_ddp_with_two_cpu_processes_matches_one_process_with_gradient_accumulation(opt, tmp_path):
    common = [*TINY_ARGS, "--drop-rate", "0.0", "--max-steps", "3", "--eval-freq", "3"]
    assert opt.cli([*common, "--grad-accum-steps", "2", "--output-dir", str(tmp_path / "single")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(FOLDER / "02_opt_multi_gpu_ddp.py"), *common, "--output-dir", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP over 2 processes" in result.stdout
    single, ddp = (read_json(tmp_path / d / "losses.json") for d in ("single", "ddp"))
    assert len(ddp["train_losses"]) == 3
    assert ddp["train_losses"] == pytest.approx(single["train_losses"], rel=1e-5)
    assert ddp["val_losses"][-1][1] == pytest.approx(single["val_losses"][-1][1], rel=1e-5)
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2


def test_02_explains_that_it_needs_torchrun(tmp_path):
    result = subprocess.run([sys.executable, str(FOLDER / "02_opt_multi_gpu_ddp.py"), *TINY_ARGS,
                             "--output-dir", str(tmp_path)], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert result.returncode == 2
    assert "start this script with torchrun" in result.stderr
