"""Faults that prepare_dataset.py and pretraining_simple.py survive: each test injects one
(a kill -9, a damaged file, a bad flag, a diverging run, a full disk, a killed launcher)
and checks that nothing is lost and the user reads one clear line, never a traceback."""

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import prepare_dataset
import pretraining_simple
import pytest
import torch
from ch05_utils import RunLock, load_checkpoint
from prepare_dataset import decode_book, load_shards, prepare, read_metadata, strip_gutenberg

HERE = Path(__file__).resolve().parent.parent
RAW = Path(os.environ.get("CH05_DATA_DIR", HERE.parents[2] / "shared" / "data")) / "gutenberg" / "raw"
pytestmark = pytest.mark.skipif(not RAW.is_dir(), reason=f"no raw Gutenberg books at {RAW}")
# A tiny model and tiny evaluations: a run of a few steps takes seconds on a busy CPU.
TINY = ["--debug", "true", "--batch-size", "4", "--eval-tokens", "64", "--eval-freq", "2", "--no-progress",
        "--device", "cpu", "--lr", "1e-3", "--warmup-steps", "0", "--print-sample-iter", "0"]
USER_FILES = {"pytorch_model_00001.bin": b"weights of the user", "my_text_2024.txt": b"notes of the user",
              "train_0000.bin": b"a file with one of our names, but not ours"}


def write_books(folder: Path, count: int, chars: int = 6000, offset: int = 0) -> Path:
    """`count` English books cut from *The Metamorphosis*, with Project Gutenberg's markers."""
    body = strip_gutenberg(decode_book((RAW / "pg5200.txt").read_bytes()))[0]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        start = (offset + i) * chars
        (folder / f"book{offset + i}.txt").write_text(
            f"*** START OF THE PROJECT GUTENBERG EBOOK {i} ***\n{body[start:start + chars]}\n"
            f"*** END OF THE PROJECT GUTENBERG EBOOK {i} ***\nLicence.\n", encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """pretraining_simple installs Ctrl-C/SIGTERM handlers; give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    raw = write_books(tmp_path_factory.mktemp("raw"), 3)
    out = tmp_path_factory.mktemp("prepared")
    prepare(raw, out, shard_tokens=700, val_fraction=0.34, workers=1, progress=False)
    return out


def call(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an in-process `main(argv)`; anything but SystemExit propagates."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The single `error:` line of stderr (argparse's usage lines may precede it)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


#####################################
# prepare_dataset.py
#####################################

def test_prepare_deletes_no_file_it_did_not_write(tmp_path):
    raw, out = write_books(tmp_path / "raw", 3), tmp_path / "out"
    out.mkdir()
    for name, data in USER_FILES.items():
        (out / name).write_bytes(data)
    prepare(raw, out, shard_tokens=700, val_fraction=0.34, workers=1, progress=False)
    prepare(raw, out, shard_tokens=900, val_fraction=0.5, workers=1, progress=False)  # a re-run, other settings
    for name, data in USER_FILES.items():
        assert (out / name).read_bytes() == data, name
    metadata = read_metadata(out)
    ours = {"metadata.json", "manifest.json", ".run.lock", *prepare_dataset.dataset_files(metadata)}
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert left == ours | set(USER_FILES)  # the first run's dataset is gone, nothing else of ours is left


def test_prepare_refuses_an_output_folder_inside_the_data_folder(tmp_path, capsys):
    raw = write_books(tmp_path / "raw", 2)
    code, _, err = call(prepare_dataset.main, ["--data-dir", raw, "--output-dir", raw / "prepared"], capsys)
    assert code == 2 and "inside --data-dir" in one_error_line(err)
    assert not (raw / "prepared").exists()


def _dataset_contents(folder: Path) -> tuple:
    """What a reader of the dataset gets: the metadata (file names without their folder) and every
    file's bytes; raises if the dataset is incomplete or damaged."""
    metadata = read_metadata(folder)
    for split in ("train", "val"):
        load_shards(folder, split)  # every shard present, with its listed length
    files = prepare_dataset.dataset_files(metadata)
    flat = json.dumps(metadata, sort_keys=True).replace(Path(files[0]).parent.name + "/", "")
    return flat, tuple((Path(f).name, (folder / f).read_bytes()) for f in files)


def _run_until_killed(at: int, raw: Path, out: Path) -> int:
    """Fork a child that runs the re-run and kills itself (SIGKILL) just before its `at`-th change to
    the file system (open for writing, rename, unlink, mkdir, rmdir). Returns the child's exit status."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    count = 0

    def counted(function, writes_only=False):
        def wrapper(*args, **kwargs):
            nonlocal count
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if not writes_only or any(c in str(mode) for c in "wax+"):
                count += 1
                if count == at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapper

    for name in ("replace", "unlink", "mkdir", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))
    builtins.open = io.open = counted(io.open, writes_only=True)
    try:
        prepare(raw, out, shard_tokens=2500, val_fraction=0.5, workers=1, progress=False)
    except BaseException:
        os._exit(3)
    os._exit(0)


def test_kill_9_at_every_point_of_a_rerun_leaves_the_old_or_the_new_dataset(tmp_path):
    """The re-run is killed just before each of its file-system changes in turn: at every point
    the folder holds the complete old or the complete new dataset, and the user's files."""
    old_raw, new_raw = write_books(tmp_path / "old", 3), write_books(tmp_path / "new", 3, offset=2)
    reference = {}
    for name, raw, shard_tokens, fraction in (("old", old_raw, 2000, 0.34), ("new", new_raw, 2500, 0.5)):
        prepare(raw, tmp_path / f"ref-{name}", shard_tokens=shard_tokens, val_fraction=fraction, workers=1,
                progress=False)
        reference[name] = _dataset_contents(tmp_path / f"ref-{name}")
    assert reference["old"] != reference["new"]
    template = tmp_path / "template"
    prepare(old_raw, template, shard_tokens=2000, val_fraction=0.34, workers=1, progress=False)
    for name, data in USER_FILES.items():
        (template / name).write_bytes(data)

    at, seen = 1, set()
    while True:
        out = tmp_path / f"killed-{at}"
        shutil.copytree(template, out)
        status = _run_until_killed(at, new_raw, out)
        if os.WIFEXITED(status):  # the run finished before its `at`-th change: every point was tried
            assert os.WEXITSTATUS(status) == 0 and at > 20
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        contents = _dataset_contents(out)
        assert contents in (reference["old"], reference["new"]), f"killed before change {at}"
        seen.add("new" if contents == reference["new"] else "old")
        for name, data in USER_FILES.items():
            assert (out / name).read_bytes() == data
        prepare(new_raw, out, shard_tokens=2500, val_fraction=0.5, workers=1, progress=False)  # run again
        assert _dataset_contents(out) == reference["new"]
        expected = {"metadata.json", "manifest.json", ".run.lock", *USER_FILES,
                    *prepare_dataset.dataset_files(read_metadata(out))}
        assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == expected
        shutil.rmtree(out)
        at += 1
    assert seen == {"old", "new"}


def _start_rerun_and_wait_for_its_shards(raw: Path, out: Path) -> subprocess.Popen:
    """Start `prepare_dataset.py` on a prepared folder; return once it writes the new dataset's shards."""
    proc = subprocess.Popen([sys.executable, str(HERE / "prepare_dataset.py"), "--data-dir", str(raw),
                             "--output-dir", str(out), "--shard-tokens", "500", "--workers", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((out / "dataset-0002").glob("*.bin")):
        time.sleep(0.005)
    return proc


def test_kill_9_of_a_real_rerun_process(tmp_path):
    """The same with a real `kill -9` of the command line, once the new dataset is being written."""
    raw, out = write_books(tmp_path / "raw", 12, chars=9000), tmp_path / "out"
    prepare(raw, out, shard_tokens=700, val_fraction=0.34, workers=1, progress=False)
    before = _dataset_contents(out)
    proc = _start_rerun_and_wait_for_its_shards(raw, out)
    proc.kill()
    proc.communicate()
    after = _dataset_contents(out)  # complete, whichever it is
    assert after == before or read_metadata(out)["settings"]["shard_tokens"] == 500


def test_ctrl_c_of_a_rerun_keeps_the_old_dataset_and_removes_the_partial_new_one(tmp_path):
    raw, out = write_books(tmp_path / "raw", 12, chars=9000), tmp_path / "out"
    prepare(raw, out, shard_tokens=700, val_fraction=0.34, workers=1, progress=False)
    before = _dataset_contents(out)
    proc = _start_rerun_and_wait_for_its_shards(raw, out)
    assert proc.poll() is None, "the re-run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Interrupted" in err and "Traceback" not in err, err
    assert _dataset_contents(out) == before
    assert not (out / "dataset-0002").exists()


def test_a_dataset_of_the_earlier_flat_layout_is_replaced_and_removed(tmp_path):
    """Earlier versions wrote the files straight into --output-dir: a re-run removes exactly those."""
    raw, out = write_books(tmp_path / "raw", 3), tmp_path / "out"
    metadata = prepare(raw, out, shard_tokens=700, val_fraction=0.34, workers=1, progress=False)
    for split in metadata["splits"].values():  # move the files up and forget the manifest
        for f in (*split["shards"], *split["text_files"]):
            (out / f["file"]).rename(out / Path(f["file"]).name)
            f["file"] = Path(f["file"]).name
    (out / "dataset-0001").rmdir()
    (out / "manifest.json").unlink()
    (out / "metadata.json").write_text(json.dumps(metadata))
    (out / "my_text_2024.txt").write_bytes(b"notes")
    flat = prepare_dataset.dataset_files(metadata)
    prepare(raw, out, shard_tokens=900, val_fraction=0.5, workers=1, progress=False)
    assert not any((out / f).exists() for f in flat)
    assert (out / "my_text_2024.txt").read_bytes() == b"notes"
    assert read_metadata(out)["settings"]["shard_tokens"] == 900


#####################################
# pretraining_simple.py: damaged data
#####################################

def _damage(folder: Path, how: str) -> str:
    """Damage a copy of a prepared dataset; return the file name the error must mention."""
    metadata = read_metadata(folder)
    shard = folder / metadata["splits"]["train"]["shards"][0]["file"]
    if how == "odd-sized shard":
        shard.write_bytes(shard.read_bytes()[:-1])
    elif how == "short shard":
        shard.write_bytes(shard.read_bytes()[:-200])
    elif how == "missing shard":
        shard.unlink()
    elif how == "token id above the vocabulary":  # in every training shard, so the first batch meets it
        for entry in metadata["splits"]["train"]["shards"]:
            np.full(entry["tokens"], 65535, dtype=np.uint16).tofile(folder / entry["file"])
        return "holds token id 65535"
    elif how == "truncated metadata.json":
        text = (folder / "metadata.json").read_text()
        (folder / "metadata.json").write_text(text[:len(text) // 2])
        return "metadata.json"
    elif how == "foreign metadata.json":
        (folder / "metadata.json").write_text("[1, 2, 3]\n")
        return "metadata.json"
    return shard.name


@pytest.mark.parametrize("how", ["odd-sized shard", "short shard", "missing shard", "token id above the vocabulary",
                                 "truncated metadata.json", "foreign metadata.json"])
def test_damaged_data_is_one_clear_line_and_never_trained_on(prepared, tmp_path, capsys, how):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    name = _damage(data, how)
    code, _, err = call(pretraining_simple.main, ["--data-dir", data, "--output-dir", tmp_path / "out", *TINY,
                                                  "--max-steps", "2"], capsys)
    assert code == 2 and name in one_error_line(err)
    assert not (tmp_path / "out" / "model.safetensors").exists()


#####################################
# pretraining_simple.py: flags, paths, the lock
#####################################

@pytest.mark.parametrize("flag,value", [("--drop-rate", "nan"), ("--drop-rate", "1.5"), ("--weight-decay", "inf"),
                                        ("--max-grad-norm", "nan"), ("--initial-lr", "inf"), ("--min-lr", "-1"),
                                        ("--lr", "nan"), ("--max-steps", "0"), ("--checkpoint-every", "-1"),
                                        ("--warmup-steps", "-2"), ("--print-sample-iter", "-1")])
def test_bad_numbers_are_refused_before_anything_happens(prepared, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    code, _, err = call(pretraining_simple.main, ["--data-dir", prepared, "--output-dir", out, *TINY,
                                                  flag, value], capsys)
    assert code == 2 and flag in one_error_line(err)
    assert not out.exists()  # refused before the output folder was even created


def test_an_unusable_output_folder_is_refused_before_training(prepared, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out, message in ((a_file, "is a file"), (a_file / "below", "not writable")):
        code, _, err = call(pretraining_simple.main, ["--data-dir", prepared, "--output-dir", out, *TINY], capsys)
        assert code == 2 and message in one_error_line(err)


def test_a_second_run_on_the_same_output_folder_is_refused(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out):  # as a running training would hold it
        code, _, err = call(pretraining_simple.main, ["--data-dir", prepared, "--output-dir", out, *TINY,
                                                      "--max-steps", "2"], capsys)
    line = one_error_line(err)
    assert code == 2 and "in use" in line and f"pid {os.getpid()}" in line
    assert not (out / "checkpoint.pth").exists()


#####################################
# pretraining_simple.py: faults during the run
#####################################

def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = call(pretraining_simple.main, [
        "--data-dir", prepared, "--output-dir", out, *TINY, "--lr", "1e30", "--max-grad-norm", "0",
        "--checkpoint-every", "1", "--max-steps", "6"], capsys)
    line = one_error_line(err)
    assert code == 1 and "diverged at step 1" in line and "holds step 1" in line
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["step"] == 1 and all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert not (out / "model.safetensors").exists()


def test_a_torn_last_log_line_does_not_block_resume(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--data-dir", prepared, "--output-dir", out, *TINY]
    assert call(pretraining_simple.main, [*args, "--max-steps", "4", "--stop-after", "2"], capsys)[0] == 0
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 2, "epoch": 0, "lo')  # a process killed in the middle of a line
    code, _, err = call(pretraining_simple.main, [*args, "--resume", "true"], capsys)
    assert code == 0, err
    steps = [e["step"] for e in pretraining_simple.read_log(out / "log.jsonl") if "loss" in e]
    assert steps == [0, 1, 2, 3]


def test_resume_refuses_a_changed_setting_by_name(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--data-dir", prepared, "--output-dir", out, *TINY]
    assert call(pretraining_simple.main, [*args, "--max-steps", "4", "--stop-after", "1"], capsys)[0] == 0
    for extra, named in ((["--batch-size", "8"], "--batch-size 8"), (["--lr", "0.01"], "--lr 0.01"),
                         (["--context-length", "16"], "--context-length 16")):
        code, _, err = call(pretraining_simple.main, [*args, "--resume", "true", *extra], capsys)
        assert code == 2 and named in one_error_line(err)
    other = tmp_path / "other"
    prepare(write_books(tmp_path / "raw", 3, offset=4), other, shard_tokens=700, val_fraction=0.34, workers=1,
            progress=False)
    code, _, err = call(pretraining_simple.main, ["--data-dir", other, "--output-dir", out, *TINY,
                                                  "--resume", "true"], capsys)
    assert code == 2 and "other data" in one_error_line(err)
    assert load_checkpoint(out / "checkpoint.pth")["step"] == 1  # untouched


def test_a_damaged_checkpoint_is_one_clear_line(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"PK\x03\x04 not really a checkpoint")
    code, _, err = call(pretraining_simple.main, ["--data-dir", prepared, "--output-dir", out, *TINY,
                                                  "--resume", "true"], capsys)
    assert code == 2 and "checkpoint.pth" in one_error_line(err)


def test_a_full_disk_while_saving_is_one_clear_line(prepared, tmp_path, capsys, monkeypatch):
    def disk_full(obj, path):
        raise OSError(errno.ENOSPC, f"Disk full while saving {path}; the previous file there (if any) is intact")

    monkeypatch.setattr(pretraining_simple, "save_checkpoint_atomic", disk_full)
    code, _, err = call(pretraining_simple.main, ["--data-dir", prepared, "--output-dir", tmp_path / "out", *TINY,
                                                  "--max-steps", "2"], capsys)
    assert code == 1 and "Disk full" in one_error_line(err)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status waits to be collected


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are a Linux feature")
def test_ddp_ranks_die_with_their_killed_launcher(prepared, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "pretraining_simple.py"), "--data-dir", str(prepared), "--output-dir", str(tmp_path),
           *TINY, "--max-steps", "100000", "--checkpoint-every", "0"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = []
    try:
        deadline = time.time() + 400
        while time.time() < deadline and launcher.poll() is None:
            if (tmp_path / "log.jsonl").is_file() and '"loss"' in (tmp_path / "log.jsonl").read_text():
                break
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert len(ranks) >= 2 and launcher.poll() is None
        launcher.kill()  # kill -9: the launcher gets no chance to stop its ranks
        launcher.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(map(_alive, ranks)):
            time.sleep(0.2)
        assert not any(map(_alive, ranks)), "ranks outlived their launcher"
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
