"""Faults the training-speed scripts survive: bad numbers, bad output paths, signals, divergence,
interrupted writes, and a killed torchrun. Each test fails without the protection it checks."""

import importlib.util
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib.figure
import pytest
import torch

FOLDER = Path(__file__).resolve().parent.parent
VERDICT = Path(os.environ.get("CH05_DATA_DIR", FOLDER.parent.parent.parent / "shared" / "data")) / "the-verdict.txt"
TINY_ARGS = ["--device", "cpu", "--model", "tiny", "--context-length", "32", "--batch-size", "2",
             "--text-file", str(VERDICT), "--no-progress", "--eval-freq", "1", "--eval-iter", "1",
             "--warmup-steps", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def load_script(filename: str):
    spec = importlib.util.spec_from_file_location("speed_faults_" + filename[:2], FOLDER / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {"00": load_script("00_orig.py"), "01": load_script("01_opt_single_gpu.py")}


#####################################
# Bad numbers and paths: one line, before any work
#####################################

@pytest.mark.parametrize("script", ["00", "01"])
@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
    ("--checkpoint-every", "-1", "--checkpoint-every must be an integer >= 0, got -1"),
])
def test_numeric_flags_refuse_nan_inf_and_out_of_range(scripts, tmp_path, capsys, script, flag, value, message):
    assert scripts[script].cli([*TINY_ARGS, "--output-dir", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}."
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_the_course_main_refuses_a_nan_learning_rate_up_front(scripts):
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": False}
    settings = {"learning_rate": float("nan"), "num_epochs": 1, "batch_size": 2, "weight_decay": 0.1}
    with pytest.raises(ValueError, match="--lr must be a positive finite number, got nan"):
        scripts["00"].main(cfg, settings, text_file=VERDICT)


@pytest.mark.parametrize("script", ["00", "01"])
def test_an_output_dir_that_is_a_file_is_refused_before_training(scripts, tmp_path, capsys, script):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("keep me")
    assert scripts[script].cli([*TINY_ARGS, "--output-dir", str(not_a_folder)]) == 2
    assert f"--output-dir {not_a_folder} is a file" in capsys.readouterr().err
    assert not_a_folder.read_text() == "keep me"


@pytest.mark.parametrize("script", ["00", "01"])
def test_a_second_run_on_the_same_output_dir_is_refused(scripts, tmp_path, capsys, script):
    """Two runs would overwrite each other's checkpoint: the folder's lock names the running one."""
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / ".lock").write_text(str(running.pid))
        assert scripts[script].cli([*TINY_ARGS, "--output-dir", str(tmp_path), "--resume"]) == 2
        assert f"is in use by another run (process {running.pid})" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    finally:
        running.kill()
        running.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(scripts, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(gone.stdout.strip())
    assert scripts["01"].cli([*TINY_ARGS, "--output-dir", str(tmp_path), "--max-steps", "1"]) == 0
    assert not (tmp_path / ".lock").exists()  # released at the end
    assert (tmp_path / "checkpoint.pth").is_file()


#####################################
# Divergence: stop, and never save NaN weights
#####################################

@pytest.mark.parametrize("script", ["00", "01"])
def test_a_diverging_run_stops_with_a_clear_message_and_saves_no_nan(scripts, tmp_path, capsys, script):
    rc = scripts[script].cli([*TINY_ARGS, "--output-dir", str(tmp_path), "--lr", "1e6", "--max-steps", "12",
                                   "--checkpoint-every", "1", "--drop-rate", "0"])
    assert rc == 1
    assert "error: The " in capsys.readouterr().err
    checkpoint = tmp_path / "checkpoint.pth"
    if checkpoint.exists():  # whatever was saved before the blow-up is finite
        weights = torch.load(checkpoint, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values())


#####################################
# Outputs are replaced atomically
#####################################

def _savefig_dies_half_way(self, fname, *args, **kwargs):
    Path(fname).write_bytes(b"\x89PNG half")
    raise OSError("disk full")


def test_a_plot_that_fails_half_way_leaves_the_previous_one(tmp_path, monkeypatch):
    from speed_train import plot_step_losses
    path = tmp_path / "loss.png"
    plot_step_losses([3.0, 2.0], [(2, 2.5)], path)
    before = path.read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _savefig_dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        plot_step_losses([3.0, 2.0, 1.0], [(2, 2.5)], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left


def test_a_token_file_that_fails_half_way_leaves_the_previous_one(tmp_path, monkeypatch):
    import numpy as np
    import speed_utils
    path = tmp_path / "tokens.npy"
    speed_utils.write_token_file(VERDICT, path)
    before = path.read_bytes()

    def save_dies_half_way(file, arr, *args, **kwargs):
        if hasattr(file, "write"):
            file.write(b"\x93NUMPY half")
        else:  # a file name
            Path(file if str(file).endswith(".npy") else f"{file}.npy").write_bytes(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", save_dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        speed_utils.write_token_file(VERDICT, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.npy"]


#####################################
# Signals: save and exit cleanly; DDP ranks die with torchrun
#####################################

class LineReader:
    """Read a child's stdout in a thread, so the test can wait for a line with a timeout."""

    def __init__(self, stream):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.lines.get(timeout=1.0))
            except queue.Empty:
                continue
            if text in self.seen[-1]:
                return
        raise AssertionError(f"{text!r} not printed within {timeout} s; got {self.seen[-5:]}")

    def rest(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


@pytest.mark.parametrize("script, first_line", [("00_orig.py", "Ep 1, Step 000000"),
                                                ("01_opt_single_gpu.py", "Step 000001")])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, script, first_line):
    proc = subprocess.Popen([sys.executable, str(FOLDER / script), *TINY_ARGS, "--num-epochs", "1000",
                             "--output-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    try:
        reader = LineReader(proc.stdout)
        reader.wait_for(first_line, timeout=300)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, reader.rest()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Stopped by" in reader.rest()
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["model"] and json.loads((tmp_path / "losses.json").read_text())["train_losses"]


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
def test_ddp_ranks_save_and_exit_when_torchrun_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(FOLDER / "02_opt_multi_gpu_ddp.py"), *TINY_ARGS, "--num-epochs", "1000",
                             "--output-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    ranks: list[int] = []
    try:
        reader = LineReader(proc.stdout)
        reader.wait_for("Step 000001", timeout=300)
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        proc.kill()  # SIGKILL: torchrun cannot forward anything
        proc.wait(timeout=30)
        deadline = time.monotonic() + 90
        while any(_running(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_running(r) for r in ranks), "DDP ranks outlived torchrun"
    finally:
        for pid in [proc.pid, *ranks]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] >= 1 and len(checkpoint["rng"]) == 2
    assert math.isfinite(checkpoint["train_losses"][-1])
