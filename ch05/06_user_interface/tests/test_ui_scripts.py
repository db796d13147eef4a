"""The folder's measuring scripts run at a tiny scale and refuse bad arguments in one line."""

import pytest


def test_batching_benchmark_checks_every_reply(capsys):
    from ui_batching_benchmark import main

    assert main(["--model", "tiny", "--sessions", "3", "--new-tokens", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("replies equal to generating alone: 3/3") == 2  # greedy and sampled
    assert "3 sessions" in out and "x |" in out and "one step of 3 rows: BLAS" in out


@pytest.mark.parametrize("args", [["--sessions", "0"], ["--new-tokens", "0"], ["--threads", "0"],
                                  ["--new-tokens", "300"]])
def test_batching_benchmark_refuses_bad_arguments(args, capsys):
    from ui_batching_benchmark import main

    assert main(["--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_int8_quality_reports_agreement_and_log_likelihood(tiny_checkpoint, capsys):
    from int8_quality import main

    assert main(["--checkpoint", str(tiny_checkpoint), "--new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement float32 vs int8:" in out and "difference" in out and "of 5 tokens equal" in out


@pytest.mark.parametrize("args,message", [(["--new-tokens", "0"], "--new-tokens"),
                                          (["--checkpoint", "no/such.pth"], "no/such.pth")])
def test_int8_quality_refuses_bad_arguments(args, message, capsys):
    from int8_quality import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_startup_benchmark_times_both_ways_of_loading(capsys):
    from ui_startup_benchmark import main

    assert main(["--model", "tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "load whole file" in out and "load weights only (app_own.py)" in out and "warm-up" in out
    assert main(["--repeats", "0"]) == 2
