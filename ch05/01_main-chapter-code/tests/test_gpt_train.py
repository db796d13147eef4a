"""gpt_train.py: learning, reproducibility, exact resume, surviving SIGKILL, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ch05_utils import load_checkpoint

import gpt_train

SCRIPT = Path(gpt_train.__file__)
# Tiny model, 18 batches per epoch of the-verdict: a few seconds per run.
FAST = ["--model", "tiny", "--batch-size", "8", "--eval-freq", "5", "--eval-iter", "1", "--no-progress"]


def train(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    assert gpt_train.main([*FAST, "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "losses.json").read_text())


def final_state(tmp_path: Path, name: str) -> dict:
    return load_checkpoint(tmp_path / name / "checkpoint.pth")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_lowers_the_loss(tmp_path):
    losses = train(tmp_path, "run", "--num-epochs", "3", "--lr", "2e-3")
    assert losses["train_losses"][-1] < losses["train_losses"][0] - 1.5  # nats: from ~11 (uniform)
    assert losses["val_losses"][-1] < losses["val_losses"][0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_same_seed_gives_identical_losses(tmp_path):
    a = train(tmp_path, "a", "--num-epochs", "1")
    b = train(tmp_path, "b", "--num-epochs", "1")
    c = train(tmp_path, "c", "--num-epochs", "1", "--seed", "7")
    assert a == b
    assert a["train_losses"] != c["train_losses"]


@pytest.mark.parametrize("stop_after", [25, 18], ids=["mid-epoch", "epoch-boundary"])
def test_resume_is_bitwise_identical(tmp_path, stop_after):
    straight = train(tmp_path, "straight", "--num-epochs", "2")
    # 18 batches per epoch: stop in the middle of the second epoch, or right after the first.
    train(tmp_path, "split", "--num-epochs", "2", "--max-steps", str(stop_after))
    resumed = train(tmp_path, "split", "--num-epochs", "2", "--resume")
    assert resumed == straight
    assert_same_weights(final_state(tmp_path, "straight"), final_state(tmp_path, "split"))


def test_resume_refuses_a_different_model(tmp_path, capsys):
    train(tmp_path, "run", "--num-epochs", "1", "--max-steps", "3")
    code = gpt_train.main([*FAST, "--output-dir", str(tmp_path / "run"), "--resume", "--context-length", "16"])
    assert code == 2
    assert "was trained with config" in capsys.readouterr().err


def test_existing_checkpoint_is_not_overwritten_by_accident(tmp_path, capsys):
    train(tmp_path, "run", "--num-epochs", "1", "--max-steps", "2")
    assert gpt_train.main([*FAST, "--output-dir", str(tmp_path / "run")]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_sigkill_at_random_moments_never_corrupts_the_checkpoint(tmp_path):
    """Kill the script repeatedly (twice while a checkpoint is being written), resume
    each time, and check the run still ends exactly where an uninterrupted one does."""
    out = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), *FAST, "--num-epochs", "2", "--checkpoint-every", "1",
           "--output-dir", str(out), "--resume"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(0)

    def writing_now() -> bool:  # replacing an existing checkpoint: the dangerous moment
        return (out / "checkpoint.pth").exists() and any(out.glob("checkpoint.pth.*.tmp"))

    def after_random_delay(delay: float):
        deadline = time.monotonic() + delay
        return lambda: time.monotonic() > deadline and (out / "checkpoint.pth").exists()

    kill_conditions = [writing_now, after_random_delay(rng.uniform(0.2, 1.5)), writing_now,
                       after_random_delay(rng.uniform(0.2, 1.5))]
    kills = 0
    for condition in kill_conditions:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and not condition():
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()
        checkpoint = load_checkpoint(out / "checkpoint.pth")  # never corrupt
        assert set(checkpoint) >= {"model", "optimizer", "progress", "rng", "config"}
    assert kills >= 2

    finished = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert not list(out.glob("*.tmp"))  # leftovers of killed writes are cleaned up

    straight = train(tmp_path, "straight", "--num-epochs", "2")
    assert json.loads((out / "losses.json").read_text()) == straight
    assert_same_weights(final_state(tmp_path, "killed"), final_state(tmp_path, "straight"))


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("Too short. " * 30, [], "too short for one batch"),
        ("", [], "is empty"),
        (None, [], "Text file not found"),
        (b"caf\xe9 latin-1 text " * 500, [], "is not valid UTF-8"),
        ("ok " * 5000, ["--device", "tpu"], "Unknown device 'tpu'"),
        ("ok " * 5000, ["--lr", "0"], "--lr must be positive"),
        ("ok " * 5000, ["--context-length", "2048"], "outside what a GPT-2 model supports"),
        ("ok " * 5000, ["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
    ids=["short", "empty", "missing", "not-utf8", "device", "lr", "context", "batch"],
)
def test_bad_input_gives_a_clear_message(tmp_path, capsys, content, extra, message):
    text_file = tmp_path / "input.txt"
    if isinstance(content, bytes):
        text_file.write_bytes(content)
    elif content is not None:
        text_file.write_text(content)
    code = gpt_train.main([*FAST, "--text-file", str(text_file), "--output-dir", str(tmp_path / "o"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_help_works():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume" in result.stdout
