"""hparam_search.py: search spaces, successive halving, the ledger, resuming and a real search."""

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ch05_utils import read_text_file, the_verdict_path
from hparam_search import (
    DEFAULT_HPARAMS,
    HPARAM_GRID,
    Ledger,
    SpaceError,
    Trial,
    grid_configs,
    grid_size,
    halving_rungs,
    main,
    prepare_data,
    run_trial,
    sample_configs,
    successive_halving,
    validate_space,
)

FOLDER = Path(__file__).resolve().parent.parent
# A search small enough for a test: 4 training windows of 32 tokens, batch size 4,
# one epoch, so every trial is one optimizer step of the tiny model.
TINY_RUN = ["--preset", "laptop", "--train-windows", "4", "--no-progress"]
TINY_SPACE = {"batch_size": [4], "n_epochs": [1], "warmup_iters": [0], "peak_lr": [0.001, 0.005]}


def write_space(tmp_path: Path, space: dict, name: str = "space.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(space))
    return str(path)


def ledger_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


#####################################
# Search spaces
#####################################

def test_course_grid_has_every_combination():
    space = validate_space(HPARAM_GRID, "grid")
    configs = grid_configs(space)
    assert grid_size(space) == len(configs) == 4 * 3 * 3 * 3 * 4 * 2 * 3 * 5 == 12_960
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    assert {c["peak_lr"] for c in configs} == set(HPARAM_GRID["peak_lr"])


def test_a_small_space_counts_its_values_and_keeps_the_defaults():
    space = validate_space({"peak_lr": [0.001, 0.005], "batch_size": [2, 4, 8], "drop_rate": 0.0}, "grid")
    configs = grid_configs(space)
    assert grid_size(space) == len(configs) == 6
    assert all(c["weight_decay"] == DEFAULT_HPARAMS["weight_decay"] and c["drop_rate"] == 0.0 for c in configs)
    assert {(c["peak_lr"], c["batch_size"]) for c in configs} == {(lr, b) for lr in (0.001, 0.005) for b in (2, 4, 8)}


@pytest.mark.parametrize("space, strategy, message", [
    ({"learning_rate": [0.001]}, "grid", "Unknown hyperparameter(s) ['learning_rate']"),
    ({"peak_lr": []}, "grid", "peak_lr: the list of values is empty"),
    ({"peak_lr": [0.001, -0.01]}, "grid", "peak_lr must be > 0.0, got -0.01"),
    ({"batch_size": [2, 2.5]}, "grid", "batch_size must be a whole number, got 2.5"),
    ({"drop_rate": [1.0]}, "grid", "drop_rate must be >= 0.0 and < 1.0"),
    ({"n_epochs": ["5"]}, "grid", "n_epochs: '5' is not a number"),
    ({"peak_lr": [0.001, 0.001]}, "grid", "repeat"),
    ({"peak_lr": {"log_uniform": [1e-4, 1e-2]}}, "grid", "grid search needs a list of values"),
    ({"peak_lr": {"normal": [1e-4, 1e-2]}}, "random", "a distribution is one of"),
    ({"peak_lr": {"log_uniform": [1e-2, 1e-4]}}, "random", "bounds are reversed"),
    ({"batch_size": {"uniform": [2, 16]}}, "random", "batch_size is a whole number: use int_uniform"),
    ([0.001], "grid", "must be a non-empty JSON object"),
    ({"peak_lr": [0.001, math.nan]}, "grid", "peak_lr must be a finite number, got nan"),
    ({"peak_lr": {"log_uniform": [1e-4, math.inf]}}, "random", "peak_lr must be a finite number, got inf"),
])
def test_invalid_spaces_are_rejected_with_a_clear_message(space, strategy, message):
    with pytest.raises(SpaceError) as err:
        validate_space(space, strategy)
    assert message in str(err.value)


def test_the_command_line_reports_a_bad_space_in_one_line(tmp_path, capsys):
    code = main(["--strategy", "grid", "--space", write_space(tmp_path, {"peak_lr": [0.001], "min_lr": [0.01]}),
                 "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: 1 of 1 configurations have initial_lr or min_lr above peak_lr")
    assert err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "broken.json").write_text("{peak_lr: 1}")
    assert main(["--space", str(tmp_path / "broken.json")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_random_configurations_are_seeded_distinct_and_within_bounds():
    space = validate_space({"peak_lr": {"log_uniform": [1e-4, 1e-2]}, "batch_size": {"int_uniform": [2, 8]},
                            "drop_rate": [0.0, 0.1]}, "random")
    first = sample_configs(space, 20, seed=7)
    assert first == sample_configs(space, 20, seed=7)
    assert first != sample_configs(space, 20, seed=8)
    assert len({json.dumps(c, sort_keys=True) for c in first}) == 20
    assert all(1e-4 <= c["peak_lr"] <= 1e-2 and 2 <= c["batch_size"] <= 8 for c in first)
    assert min(c["peak_lr"] for c in first) < 1e-3 < max(c["peak_lr"] for c in first)  # log scale covers both decades
    finite = validate_space({"peak_lr": [0.001, 0.002]}, "random")
    assert len(sample_configs(finite, 10, seed=0)) == 2  # a space smaller than n: every point once


#####################################
# Successive halving on a synthetic objective
#####################################

def true_loss(x: int) -> float:
    return 1.0 + (x - 17) ** 2 / 10


def observed_loss(x: int, tokens: int) -> float:
    """The true loss plus noise that shrinks with the budget: large enough to reorder the
    first rung, too small to hide the best configuration in the last."""
    noise = ((x * 7919) % 13) / 13  # fixed pseudo-random number in [0, 1) per configuration
    return true_loss(x) + 3.0 * noise * (100 / tokens) ** 2


def test_halving_rungs_split_the_budget_evenly():
    assert halving_rungs(27, 8100, eta=3) == [(27, 100), (9, 300), (3, 900)]
    assert halving_rungs(10, 1000, eta=2) == [(10, 33), (5, 66), (2, 166)]
    assert halving_rungs(1, 500, eta=3) == [(1, 500)]
    for n, budget, eta in [(27, 8100, 3), (10, 1000, 2), (50, 123_457, 3)]:
        rungs = halving_rungs(n, budget, eta)
        assert sum(count * tokens for count, tokens in rungs) <= budget


def test_successive_halving_promotes_the_best_of_each_rung():
    configs = [{"x": x} for x in range(27)]
    calls = []

    def run_rung(survivors, tokens, rung):
        calls.append((len(survivors), tokens, rung))
        return [observed_loss(c["x"], tokens) for c in survivors]

    history = successive_halving(configs, budget_tokens=8100, eta=3, run_rung=run_rung)
    assert calls == [(27, 100, 0), (9, 300, 1), (3, 900, 2)]
    for entry, keep in zip(history, (9, 3, 1), strict=True):
        expected = sorted(entry["configs"], key=lambda c: observed_loss(c["x"], entry["tokens"]))[:keep]
        assert entry["promoted"] == expected
    # The first rung's noise reorders configurations (so promotion is not trivially by x)...
    first = history[0]
    assert sorted(first["promoted"], key=lambda c: true_loss(c["x"])) != first["promoted"]
    # ...but the winner is the truly best configuration, and every rung kept it.
    assert history[-1]["promoted"] == [{"x": 17}]
    assert all({"x": 17} in entry["promoted"] for entry in history)


def test_successive_halving_never_promotes_a_diverged_trial_and_stops_when_told():
    configs = [{"x": x} for x in range(4)]
    losses = {0: None, 1: 2.0, 2: math.nan, 3: 1.0}
    history = successive_halving(configs, 400, eta=2, run_rung=lambda cs, t, r: [losses[c["x"]] for c in cs])
    assert history[0]["promoted"] == [{"x": 3}, {"x": 1}]
    assert successive_halving(configs, 400, eta=2, run_rung=lambda cs, t, r: None) == []


#####################################
# The ledger
#####################################

def _append_many(path: str, worker: int, n: int) -> None:
    ledger = Ledger(path)
    for i in range(n):
        ledger.append({"key": f"{worker}-{i}", "padding": "x" * 20_000})


def test_parallel_appends_keep_every_line_whole(tmp_path):
    path = tmp_path / "ledger.jsonl"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_append_many, args=(str(path), w, 40)) for w in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    records = ledger_lines(path)  # every line parses: none was interleaved with another
    assert sorted(r["key"] for r in records) == sorted(f"{w}-{i}" for w in range(4) for i in range(40))


def record(key: str, **extra) -> dict:
    """A minimal ledger record: what resuming, budgets, the table and the plot read."""
    return {"key": key, "hparams": {"peak_lr": 0.001}, "val_loss": 7.0, "train_loss": 7.1, "tokens": 128,
            "seconds": 1.0, **extra}


def test_a_fragment_left_by_a_crash_is_skipped_and_does_not_spoil_the_next_record(tmp_path, capsys):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(record("a"))
    with open(path, "a") as f:
        f.write('{"key": "b", "val_')  # what a power cut mid-write could leave
    ledger.append(record("c"))
    assert [r["key"] for r in ledger.records()] == ["a", "c"]
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    ledger.append(record("a", duplicate=True))
    assert ledger.completed()["a"] == record("a")  # a trial recorded twice counts once


#####################################
# Real searches on the-verdict
#####################################

def test_tiny_search_writes_ledger_and_plot_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--strategy", "grid", "--space", write_space(tmp_path, TINY_SPACE), "--output-dir", str(out), *TINY_RUN]
    assert main(args) == 0
    printed = capsys.readouterr().out
    records = ledger_lines(out / "ledger.jsonl")
    assert len(records) == 2 and {r["hparams"]["peak_lr"] for r in records} == {0.001, 0.005}
    for r in records:
        assert r["steps"] == 1 and r["tokens"] == 4 * 32 and r["val_windows"] >= 2
        assert r["seconds"] > 0 and len(r["key"]) == 16
        assert 5.0 < r["val_loss"] < 12.0 and 5.0 < r["train_loss"] < 12.0  # near ln(50257) = 10.8 after 1 step
    best = min(records, key=lambda r: r["val_loss"])
    assert f"{best['val_loss']:.3f}" in printed.split("Best of 2 trial(s)")[1].splitlines()[2]
    png = (out / "val_loss_vs_hparams.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000

    # Seeded: the same trial, run again, gives the same losses.
    data = prepare_data(read_text_file(the_verdict_path()), 32, 0.9, train_windows=4)
    again = run_trial(Trial(best["hparams"], "tiny", 123, data.fingerprint), data, torch.device("cpu"))
    assert again["key"] == best["key"]
    assert again["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)

    # Rerunning skips the finished trials; a grown space runs only its new point.
    assert main(args) == 0
    assert "2 already in" in capsys.readouterr().out
    assert len(ledger_lines(out / "ledger.jsonl")) == 2
    bigger = write_space(tmp_path, {**TINY_SPACE, "peak_lr": [0.001, 0.005, 0.0005]}, "bigger.json")
    assert main(["--strategy", "grid", "--space", bigger, "--output-dir", str(out), *TINY_RUN]) == 0
    assert "2 already in" in capsys.readouterr().out
    lines = ledger_lines(out / "ledger.jsonl")
    assert len(lines) == 3 and lines[:2] == records and lines[2]["hparams"]["peak_lr"] == 0.0005


def test_successive_halving_search_trains_the_rungs_within_the_budget(tmp_path, capsys):
    out = tmp_path / "halving"
    space = {"batch_size": [4], "warmup_iters": [0], "peak_lr": {"log_uniform": [1e-4, 1e-2]}}
    code = main(["--strategy", "halving", "--space", write_space(tmp_path, space), "--n-trials", "4",
                 "--eta", "2", "--budget-tokens", str(4 * 128 + 2 * 256), "--output-dir", str(out),
                 *TINY_RUN])
    printed = capsys.readouterr().out
    assert code == 0, printed
    records = ledger_lines(out / "ledger.jsonl")
    rung0 = [r for r in records if r["rung"] == 0]
    rung1 = [r for r in records if r["rung"] == 1]
    assert (len(rung0), len(rung1)) == (4, 2)
    assert {r["tokens"] for r in rung0} == {128} and {r["tokens"] for r in rung1} == {256}
    best_two = sorted(rung0, key=lambda r: r["val_loss"])[:2]
    assert {r["hparams"]["peak_lr"] for r in rung1} == {r["hparams"]["peak_lr"] for r in best_two}
    assert "Best of 2 trial(s) in the last rung" in printed


def _children(pid: int) -> list[int]:
    """The live (not zombie) child processes of `pid`, read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_parallel_search(tmp_path: Path, out: Path, n_trials: int = 40) -> tuple[subprocess.Popen, list, list[int]]:
    """A --workers 2 search, returned once it has finished two trials, with its command and workers."""
    ledger = out / "ledger.jsonl"
    space = write_space(tmp_path, {**TINY_SPACE, "peak_lr": {"log_uniform": [1e-4, 1e-2]}})
    command = [sys.executable, str(FOLDER / "hparam_search.py"), "--strategy", "random", "--n-trials",
               str(n_trials), "--space", space, "--workers", "2", "--output-dir", str(out), *TINY_RUN]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    search = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    while not (ledger.is_file() and ledger.read_text().count("\n") >= 2):
        assert search.poll() is None, search.stdout.read().decode()
        assert time.monotonic() < deadline, "the search wrote no trial in time"
        time.sleep(0.05)
    workers = _children(search.pid)
    assert len(workers) >= 2, workers  # the two workers (and the resource tracker, if any)
    return search, command, workers


def _wait_until_gone(pids: list[int], seconds: float = 20) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads child processes from /proc")
def test_sigkill_of_the_search_ends_its_workers_and_a_rerun_records_every_trial_once(tmp_path):
    """`kill -9` of the search process alone: its workers must not live on, and running the
    same command again (in one process: trial keys do not depend on the number of
    workers) finishes the search with every trial in the ledger once."""
    out = tmp_path / "killed"
    search, command, workers = _start_parallel_search(tmp_path, out, n_trials=12)
    os.kill(search.pid, signal.SIGKILL)
    search.wait()
    try:
        assert _wait_until_gone(workers) == [], "worker processes outlived the killed search"
    finally:
        for pid in workers:  # never leave a stray process behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    ledger = out / "ledger.jsonl"
    before = ledger_lines(ledger)
    assert 2 <= len(before) < 12, "the search finished before it could be killed"

    command[command.index("--workers") + 1] = "1"
    finished = subprocess.run(command, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"{len(before)} already in" in finished.stdout
    after = ledger_lines(ledger)
    assert after[:len(before)] == before
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 12


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads child processes from /proc")
def test_sigterm_stops_the_search_and_its_workers_at_once(tmp_path):
    out = tmp_path / "terminated"
    search, _, workers = _start_parallel_search(tmp_path, out)
    os.kill(search.pid, signal.SIGTERM)
    try:
        search.wait(timeout=30)
        printed = search.stdout.read().decode()
        assert search.returncode == 128 + signal.SIGTERM, printed
        assert "Stopped by SIGTERM" in printed and "Traceback" not in printed
        assert _wait_until_gone(workers, seconds=5) == [], "worker processes outlived the stopped search"
    finally:
        for pid in [search.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not (out / "hparam_search.lock").exists()  # released on the way out


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads child processes from /proc")
def test_a_worker_killed_from_outside_ends_the_search_with_one_line(tmp_path):
    out = tmp_path / "oom"
    search, _, workers = _start_parallel_search(tmp_path, out)
    spawned = [p for p in workers if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    os.kill(spawned[0], signal.SIGKILL)  # what the kernel's out-of-memory killer does
    try:
        search.wait(timeout=60)
        printed = search.stdout.read().decode()
        assert search.returncode == 1, printed
        assert "error: a worker process died (out of memory?)" in printed and "Traceback" not in printed
        assert _wait_until_gone(workers, seconds=5) == []
    finally:
        for pid in [search.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(ledger_lines(out / "ledger.jsonl")) >= 2  # the finished trials are kept


def test_an_output_dir_that_is_a_file_is_refused_before_any_trial(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("my notes")
    code = main(["--strategy", "grid", "--space", write_space(tmp_path, TINY_SPACE), "--output-dir", str(target),
                 *TINY_RUN])
    assert code == 2
    assert capsys.readouterr().err == f"error: cannot use --output-dir {target}: it is a file, not a folder.\n"
    assert target.read_text() == "my notes"


def test_a_second_search_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    space = write_space(tmp_path, {**TINY_SPACE, "n_epochs": [100000]})  # runs until it is stopped
    command = [sys.executable, str(FOLDER / "hparam_search.py"), "--strategy", "grid", "--space", space,
               "--output-dir", str(out), *TINY_RUN]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "hparam_search.lock").is_file() or not (out / "hparam_search.lock").read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first search did not start"
            time.sleep(0.05)
        code = main(["--strategy", "grid", "--space", space, "--output-dir", str(out), *TINY_RUN])
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {out} is in use by another search (pid {first.pid}, started ")
    assert err.count("\n") == 1
    assert not (out / "ledger.jsonl").exists()  # the refused search wrote nothing
    # The killed holder's lock is gone with it: the folder can be used again.
    assert main(["--strategy", "grid", "--space", write_space(tmp_path, TINY_SPACE, "small.json"),
                 "--output-dir", str(out), *TINY_RUN]) == 0


@pytest.mark.parametrize("line, problem", [
    ("[1, 2]", "a JSON list, not an object"),
    ('"trial 3"', "a JSON str, not an object"),
    ('{"key": "abc"}', "no 'hparams' field"),
    ('{"key": "abc", "hparams": {}, "val_loss": "low", "train_loss": 1.0, "tokens": 1, "seconds": 1}',
     "'val_loss' is 'low'"),
])
def test_a_ledger_line_that_is_json_but_not_a_record_gets_one_line(tmp_path, capsys, line, problem):
    out = tmp_path / "foreign"
    out.mkdir()
    ledger = out / "ledger.jsonl"
    Ledger(ledger).append(record("a"))
    with open(ledger, "a") as f:
        f.write(line + "\n")
    code = main(["--strategy", "grid", "--space", write_space(tmp_path, TINY_SPACE), "--output-dir", str(out),
                 *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"error: {ledger} line 2 is not a trial record of hparam_search.py ({problem}); "
                   "remove that line or use another --output-dir.\n")


def test_a_torn_last_ledger_line_is_skipped_and_its_trial_reruns(tmp_path, capsys):
    out = tmp_path / "torn"
    args = ["--strategy", "grid", "--space", write_space(tmp_path, TINY_SPACE), "--output-dir", str(out), *TINY_RUN]
    assert main(args) == 0
    ledger = out / "ledger.jsonl"
    first, second = ledger.read_text().splitlines()
    ledger.write_text(first + "\n" + second[: len(second) // 2])  # a write cut off by a power cut
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "1 already in" in captured.out and "1 to run" in captured.out
    assert "skipped 1 unreadable line(s)" in captured.err and "Traceback" not in captured.err
    lines = ledger.read_text().splitlines()
    assert json.loads(lines[0]) == json.loads(first) and json.loads(lines[-1])["key"] == json.loads(second)["key"]


@pytest.mark.parametrize("flags, message", [
    (["--budget-seconds", "nan"], "--budget-seconds must be a positive number"),
    (["--budget-seconds", "inf"], "--budget-seconds must be a positive number"),
    (["--train-ratio", "nan"], "--train-ratio must be between 0 and 1, got nan"),
    (["--train-ratio", "1.5"], "--train-ratio must be between 0 and 1, got 1.5"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (["--workers", "100000"], "--workers must be between 1 and the number of CPU cores"),
    (["--eta", "1"], "--eta must be at least 2"),
])
def test_bad_numeric_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    """Refused up front: before the text is read (the --text-file here does not exist)."""
    out = tmp_path / "never"
    code = main(["--preset", "laptop", "--text-file", str(tmp_path / "missing.txt"), "--output-dir", str(out),
                 *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_the_cost_estimate_prices_every_configuration_by_its_steps(monkeypatch):
    """With a fake clock (each step of batch size b takes b/100 s, evaluation 1 s), the
    projection must be the exact sum over the grid of epochs x steps per epoch x step time."""
    import hparam_search

    def fake_trial(trial, data, device):
        steps = trial.total_steps(len(data.train_inputs) // trial.hparams["batch_size"])
        train_seconds = steps * trial.hparams["batch_size"] / 100
        return {"steps": steps, "train_seconds": train_seconds, "seconds": train_seconds + 1.0}

    monkeypatch.setattr(hparam_search, "run_trial", fake_trial)
    n_windows = 100
    data = hparam_search.SearchData(torch.zeros(n_windows, 32, dtype=torch.long), None, None, None, "fake")
    configs = grid_configs(validate_space({"batch_size": [2, 4], "n_epochs": [1, 3]}, "grid"))
    cost = hparam_search.estimate_cost(configs, data, "tiny", torch.device("cpu"), seed=1)
    assert cost["seconds_per_step"] == {2: pytest.approx(0.02), 4: pytest.approx(0.04)}
    assert cost["steps_per_epoch"] == {2: 50, 4: 25}
    expected = sum(epochs * (n_windows // b) * b / 100 + 1.0 for b in (2, 4) for epochs in (1, 3))
    assert cost["total_seconds"] == pytest.approx(expected)
    assert cost["mean_seconds_per_trial"] == pytest.approx(expected / 4)
