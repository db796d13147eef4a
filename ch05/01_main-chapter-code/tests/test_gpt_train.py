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
    assert gpt_train.cli([*FAST, "--output-dir", str(out), *extra]) == 0
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
    code = gpt_train.cli([*FAST, "--output-dir", str(tmp_path / "run"), "--resume", "--context-length", "16"])
    assert code == 2
    assert "--context-length 16 differs from the checkpoint's" in capsys.readouterr().err


def test_existing_checkpoint_is_not_overwritten_by_accident(tmp_path, capsys):
    train(tmp_path, "run", "--num-epochs", "1", "--max-steps", "2")
    assert gpt_train.cli([*FAST, "--output-dir", str(tmp_path / "run")]) == 2
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
        return (out / "checkpoint.pth").exists() and (out / "checkpoint.pth.tmp").exists()

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
        ("ok " * 5000, ["--lr", "0"], "--lr must be a positive number"),
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
    code = gpt_train.cli([*FAST, "--text-file", str(text_file), "--output-dir", str(tmp_path / "o"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_help_works():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume" in result.stdout


#####################################
# Faults: signals, locks, divergence, resume settings, bad files
#####################################

def start_run(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), *FAST, "--num-epochs", "50", "--output-dir", str(out), *extra]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_training(proc: subprocess.Popen) -> None:
    """Block until the run prints its first evaluation (training has begun)."""
    for line in proc.stdout:
        if line.startswith("Ep 1 (Step"):
            return
    raise AssertionError(proc.stderr.read())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    out = tmp_path / "run"
    proc = start_run(out, "--save-every-minutes", "0")
    wait_for_training(proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Continue with --resume" in err and "Traceback" not in err
    progress = load_checkpoint(out / "checkpoint.pth")["progress"]
    assert progress["global_step"] >= 0  # saved after the step it was in
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--max-steps", str(progress["global_step"] + 2),
                          "--output-dir", str(out), "--resume"]) == 0


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    first = start_run(out)
    try:
        wait_for_training(first)
        second = subprocess.run([sys.executable, str(SCRIPT), *FAST, "--output-dir", str(out), "--resume"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"in use by a running job (pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only"])
def test_an_unusable_output_folder_is_refused_before_training(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / "file" / "out"
    else:
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is still writable")
    assert gpt_train.cli([*FAST, "--output-dir", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "Training" not in captured.out


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--max-steps", "2", "--output-dir", str(out)]) == 0
    good = load_checkpoint(out / "checkpoint.pth")
    code = gpt_train.cli([*FAST, "--num-epochs", "1", "--output-dir", str(out), "--overwrite", "--lr", "1e6",
                          "--checkpoint-every", "1"])
    assert code == 1
    assert "training diverged" in capsys.readouterr().err
    kept = load_checkpoint(out / "checkpoint.pth")
    assert all(torch.isfinite(t).all() for t in kept["model"].values())
    assert kept["progress"]["global_step"] < 3 or kept["progress"] == good["progress"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "4"], "--batch-size 4 differs from the checkpoint's 8"),
    (["--lr", "0.001"], "--lr 0.001 differs from the checkpoint's 0.0004"),
    (["--seed", "7"], "--seed 7 differs"),
], ids=["batch-size", "lr", "seed"])
def test_resume_refuses_a_changed_setting_by_name(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--max-steps", "2", "--output-dir", str(out)]) == 0
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--output-dir", str(out), "--resume", *flags]) == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_a_changed_text_and_takes_the_checkpoints_settings(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    out = tmp_path / "run"
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--max-steps", "2", "--output-dir", str(out),
                          "--text-file", str(text), "--lr", "1e-3"]) == 0
    # Without the flags, --resume takes the checkpoint's text file and learning rate.
    assert gpt_train.cli(["--model", "tiny", "--no-progress", "--num-epochs", "1", "--max-steps", "3",
                          "--output-dir", str(out), "--resume"]) == 0
    saved = load_checkpoint(out / "checkpoint.pth")
    assert saved["settings"]["lr"] == 1e-3 and saved["settings"]["text_file"] == str(text)
    text.write_text(text.read_text() + " more")
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--output-dir", str(out), "--resume"]) == 2
    assert "is not the text" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["truncated", "garbage", "weights-only"])
def test_resume_from_a_bad_checkpoint_is_one_clear_line(tmp_path, capsys, content):
    out = tmp_path / "run"
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--max-steps", "1", "--output-dir", str(out)]) == 0
    path = out / "checkpoint.pth"
    if content == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    else:
        torch.save(load_checkpoint(path)["model"], path)  # the book's model.pth format
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and err.count("\n") == 1


def test_disk_full_while_saving_is_one_line_and_keeps_the_old_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--max-steps", "1", "--output-dir", str(out)]) == 0
    before = (out / "checkpoint.pth").read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert gpt_train.cli([*FAST, "--num-epochs", "1", "--max-steps", "2", "--output-dir", str(out),
                          "--resume"]) == 2
    assert "Disk full while saving" in capsys.readouterr().err
    assert (out / "checkpoint.pth").read_bytes() == before
    assert not (out / "checkpoint.pth.tmp").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--weight-decay", "nan"], "--weight-decay must be"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--save-every-minutes", "-5"], "--save-every-minutes must be"),
], ids=["lr-nan", "lr-inf", "wd-nan", "max-steps-0", "checkpoint-every-negative", "save-minutes-negative"])
def test_bad_numbers_are_refused_up_front(tmp_path, capsys, flags, message):
    assert gpt_train.cli([*FAST, "--output-dir", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o").exists()
