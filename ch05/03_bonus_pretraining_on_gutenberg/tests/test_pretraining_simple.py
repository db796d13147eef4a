"""Tests of pretraining_simple.py: it learns, resumes exactly, survives SIGKILL while saving,
and gives the same losses under torchrun with two CPU processes as in one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ch05_utils import load_checkpoint
from prepare_dataset import prepare
from pretraining_simple import build_parser, load_split, main, window_order
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent.parent
SCRIPT = HERE / "pretraining_simple.py"
RAW = Path(os.environ.get("CH05_DATA_DIR", HERE.parents[2] / "shared" / "data")) / "gutenberg" / "raw"
pytestmark = pytest.mark.skipif(not RAW.is_dir(), reason=f"no raw Gutenberg books at {RAW}")
# A tiny model and a short run: a few seconds per invocation on 2 CPU cores.
TINY_RUN = ["--debug", "true", "--batch-size", "4", "--lr", "2e-2", "--warmup-steps", "2", "--eval-freq", "4",
            "--eval-tokens", "256", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    for name in ("pg5200.txt", "pg84.txt"):  # two English books: one per split
        (raw / name).write_bytes((RAW / name).read_bytes())
    out = tmp_path_factory.mktemp("prepared")
    prepare(raw, out, shard_tokens=20_000, val_fraction=0.5, workers=1, progress=False)
    return out


def train(data_dir: Path, output_dir: Path, *extra: str, torchrun: int = 0, check: bool = True):
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(data_dir), "--output-dir", str(output_dir), *TINY_RUN, *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def step_entries(output_dir: Path) -> list[dict]:
    """The per-step log lines, without the timing (which differs between runs)."""
    lines = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in lines]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(data_dir, out, "--max-steps", "8")
    return out


def test_booleans_parse_correctly():
    parser = build_parser()
    assert parser.parse_args(["--debug", "false"]).debug is False
    assert parser.parse_args(["--debug", "False"]).debug is False
    assert parser.parse_args(["--debug"]).debug is True
    assert parser.parse_args(["--debug", "yes", "--shuffle", "0"]).shuffle is False
    assert parser.parse_args([]).debug is False and parser.parse_args([]).shuffle is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume", "maybe"])


def test_shards_and_text_files_give_the_same_stream(data_dir):
    for split in ("train", "val"):
        shards, text = load_split(data_dir, split, "shards"), load_split(data_dir, split, "text")
        assert len(shards) == len(text) > 10_000
        assert np.array_equal(shards.read(0, len(shards)), text.read(0, len(text)))
        assert np.array_equal(shards.read(19_990, 20), np.concatenate(shards.arrays)[19_990:20_010])  # across shards


def test_window_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(window_order(50, 1, 123, True), window_order(50, 1, 123, True))
    assert not np.array_equal(window_order(50, 1, 123, True), window_order(50, 2, 123, True))
    assert sorted(window_order(50, 1, 123, True)) == list(range(50))
    assert list(window_order(5, 3, 1, False)) == [0, 1, 2, 3, 4]


def test_a_few_steps_lower_the_loss(straight_run):
    entries = step_entries(straight_run)
    losses = [e["loss"] for e in entries if "loss" in e]
    val = [e["val_loss"] for e in entries if "val_loss" in e]
    assert len(losses) == 8 and len(val) == 3  # evaluations at steps 0, 4 and 7 (the last)
    assert losses[-1] < losses[0] - 0.3 and val[-1] < val[0] - 0.3
    lrs = [e["lr"] for e in entries if "lr" in e]
    assert lrs[0] == 1e-5 and lrs[2] == 2e-2 and lrs[-1] < lrs[2]  # warm-up, then decay
    assert all(e["grad_norm"] > 0 for e in entries if "grad_norm" in e)
    assert (straight_run / "loss.png").stat().st_size > 1000
    checkpoint = load_checkpoint(straight_run / "checkpoint.pth")
    assert checkpoint["step"] == 8 and checkpoint["settings"]["max_steps"] == 8


def test_resume_is_exact(data_dir, straight_run, tmp_path):
    first = train(data_dir, tmp_path, "--max-steps", "8", "--stop-after", "3")
    assert "continue with --resume true" in first.stdout
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 3
    refused = train(data_dir, tmp_path, "--max-steps", "8", check=False)
    assert refused.returncode == 2 and "--resume true" in refused.stderr
    train(data_dir, tmp_path, "--resume", "true")  # the settings come from the checkpoint
    assert step_entries(tmp_path) == step_entries(straight_run)
    resumed, straight = load_file(tmp_path / "model.safetensors"), load_file(straight_run / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_sigkill_while_saving_never_corrupts_the_checkpoint(data_dir, straight_run, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(data_dir), "--output-dir", str(tmp_path), *TINY_RUN,
           "--max-steps", "8", "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    caught_mid_write = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.suffix == ".tmp" for p in tmp_path.iterdir()) and (tmp_path / "checkpoint.pth").exists():
            os.kill(proc.pid, signal.SIGKILL)  # while a second (or later) checkpoint is being written
            caught_mid_write = True
            break
        time.sleep(0.001)
    proc.wait()
    assert caught_mid_write, "the run ended before a checkpoint write could be interrupted"
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")  # loads: not corrupt
    assert 1 <= checkpoint["step"] < 8
    train(data_dir, tmp_path, "--resume", "true")
    assert not list(tmp_path.glob("*.tmp"))
    assert step_entries(tmp_path) == step_entries(straight_run)


def test_torchrun_two_processes_match_one(data_dir, tmp_path):
    no_dropout = ["--max-steps", "4", "--drop-rate", "0", "--eval-freq", "2"]
    train(data_dir, tmp_path / "one", *no_dropout)
    two = train(data_dir, tmp_path / "two", *no_dropout, torchrun=2)
    assert "Done: 4 steps" in two.stdout
    one_log, two_log = step_entries(tmp_path / "one"), step_entries(tmp_path / "two")
    assert len(one_log) == len(two_log) == 4 + 3
    for a, b in zip(one_log, two_log, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_cli_errors(tmp_path, data_dir, capsys):
    for args, message in (([], "error: --data-dir"), (["--batch-size", "100000"], "too small for one batch"),
                          (["--lr", "1e-3", "--min-lr", "1e-2"], "must not exceed peak_lr")):
        data = tmp_path if not args else data_dir
        with pytest.raises(SystemExit) as exit_info:
            main(["--data-dir", str(data), "--output-dir", str(tmp_path / "out"), *TINY_RUN, *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_ctrl_c_saves_the_last_completed_step(data_dir, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(data_dir), "--output-dir", str(tmp_path), *TINY_RUN,
           "--max-steps", "1000", "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    steps = [e for e in step_entries(tmp_path) if "loss" in e]
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pth")
    assert 2 <= checkpoint["step"] == len(steps) < 1000
    assert f"saved step {checkpoint['step']}" in stdout
