"""Every memory-efficient method loads exactly the weights naive loading does; bad files
and bad settings end in one clear line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmark_weight_loading import LOCK_NAME, format_table, main, run_in_subprocess
from memory_efficient_loading import (
    METHODS,
    MODEL_CONFIGS,
    PeakMemory,
    check_fully_loaded,
    load_naive,
    save_random_weights,
    weights_file_for,
)
from previous_chapters import GPTModel
from safetensors.torch import load_file, save_file

CFG = MODEL_CONFIGS["tiny"]
FOLDER = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    save_random_weights(CFG, folder, "tiny")
    return folder


@pytest.fixture(scope="module")
def reference(weights_dir):
    """The naively loaded model and its logits on a full-context batch."""
    model = load_naive(weights_file_for("naive", weights_dir, "tiny"), CFG)
    idx = torch.randint(0, CFG["vocab_size"], (2, CFG["context_length"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, idx, model(idx)


def test_random_weights_are_those_of_a_seeded_model_masks_included(weights_dir):
    torch.manual_seed(123)
    expected = GPTModel(CFG).state_dict()
    saved = torch.load(weights_dir / "tiny.pth", weights_only=True)
    assert saved.keys() == expected.keys()
    assert "trf_blocks.1.att.mask" in saved
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert load_file(weights_dir / "tiny.safetensors").keys() == expected.keys()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_loads_the_same_weights_and_logits(method, weights_dir, reference):
    ref_model, idx, ref_logits = reference
    model = METHODS[method](weights_file_for(method, weights_dir, "tiny"), CFG, "cpu")
    check_fully_loaded(model)
    ref_state = ref_model.state_dict()
    assert model.state_dict().keys() == ref_state.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(idx), ref_logits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_files_saved_without_masks_get_causal_masks(method, weights_dir, reference, tmp_path):
    """Files written before the masks were part of the state dict still load, with working masks."""
    _, idx, ref_logits = reference
    weights = {k: v for k, v in torch.load(weights_dir / "tiny.pth", weights_only=True).items()
               if not k.endswith(".att.mask")}
    path = tmp_path / ("old.safetensors" if method == "safetensors_lazy" else "old.pth")
    save_file(weights, path) if method == "safetensors_lazy" else torch.save(weights, path)
    model = METHODS[method](path, CFG, "cpu")
    with torch.no_grad():
        assert torch.equal(model(idx), ref_logits)


def test_config_is_read_from_a_checkpoint_or_the_shapes(tmp_path, reference):
    """A gpt_train.py checkpoint carries its config; a plain state dict of a GPT-2 width needs none."""
    ref_model, idx, ref_logits = reference
    torch.save({"model": ref_model.state_dict(), "config": CFG, "optimizer": {}}, tmp_path / "checkpoint.pth")
    with torch.no_grad():
        assert torch.equal(METHODS["mmap"](tmp_path / "checkpoint.pth")(idx), ref_logits)
    small = {**CFG, "emb_dim": 768, "n_heads": 12, "n_layers": 1, "context_length": 8}
    torch.save(GPTModel(small).state_dict(), tmp_path / "model.pth")
    assert METHODS["naive"](tmp_path / "model.pth").trf_blocks[0].att.num_heads == 12


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory() as memory:
        block = torch.ones(128 * 1024 * 1024 // 4)  # 128 MiB, written so that its pages are resident
        del block
    assert memory.added_rss > 96 * 1024 * 1024, (memory.rss_before, memory.peak_rss)
    assert memory.gpu_peak is None and memory.seconds >= 0


#####################################
# Faults: one line naming the file
#####################################

def _write_pth(path, weights_dir, damage):
    state_dict = torch.load(weights_dir / "tiny.pth", weights_only=True)
    damage(state_dict)
    torch.save(state_dict, path)


def _truncated(path, weights_dir, suffix):
    data = (weights_dir / f"tiny{suffix}").read_bytes()
    path.write_bytes(data[: len(data) // 2])


PTH_FAULTS = {
    "truncated": (lambda p, w: _truncated(p, w, ".pth"), "not a readable PyTorch checkpoint"),
    "garbage": (lambda p, w: p.write_bytes(b"\x00garbage" * 100), "not a readable PyTorch checkpoint"),
    "foreign": (lambda p, w: torch.save({"optimizer_state": {"lr": 0.1}}, p), "holds no model state dict"),
    "missing tensor": (lambda p, w: _write_pth(p, w, lambda sd: sd.pop("trf_blocks.1.ff.layers.2.bias")),
                       "lacks tensor 'trf_blocks.1.ff.layers.2.bias'"),
    "wrong shape": (lambda p, w: _write_pth(p, w, lambda sd: sd.update({"pos_emb.weight": torch.zeros(32, 64)})),
                    r"'pos_emb.weight' has shape \(32, 64\), the model expects \(64, 64\)"),
    "unexpected tensor": (lambda p, w: _write_pth(p, w, lambda sd: sd.update({"trf_blocks.7.x": torch.zeros(1)})),
                          "has tensor 'trf_blocks.7.x' that the model has no place for"),
    "integer weights": (lambda p, w: _write_pth(p, w, lambda sd: sd.update({"final_norm.shift": torch.zeros(64,
                                                                            dtype=torch.int64)})),
                        "'final_norm.shift' has dtype torch.int64"),
}


@pytest.mark.parametrize("fault", sorted(PTH_FAULTS))
@pytest.mark.parametrize("method", ["naive", "sequential", "meta_assign", "mmap"])
def test_bad_pth_file_is_one_clear_error(fault, method, weights_dir, tmp_path):
    write, message = PTH_FAULTS[fault]
    path = tmp_path / "model.pth"
    write(path, weights_dir)
    with pytest.raises(ValueError, match=message) as info:
        METHODS[method](path, CFG, "cpu")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _write_st(path, weights_dir, damage):
    tensors = load_file(weights_dir / "tiny.safetensors")
    damage(tensors)
    save_file(tensors, path)


ST_FAULTS = {
    "truncated": (lambda p, w: _truncated(p, w, ".safetensors"), "not a readable safetensors file"),
    "garbage": (lambda p, w: p.write_bytes(b"\xff" * 64), "not a readable safetensors file"),
    "missing tensor": (lambda p, w: _write_st(p, w, lambda t: t.pop("tok_emb.weight")), "lacks tensor 'tok_emb"),
    "wrong shape": (lambda p, w: _write_st(p, w, lambda t: t.update({"out_head.weight": torch.zeros(5, 64)})),
                    r"'out_head.weight' has shape \(5, 64\)"),
    "foreign": (lambda p, w: save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, p),
                "lacks tensor"),
}


@pytest.mark.parametrize("fault", sorted(ST_FAULTS))
def test_bad_safetensors_file_is_one_clear_error(fault, weights_dir, tmp_path):
    write, message = ST_FAULTS[fault]
    path = tmp_path / "model.safetensors"
    write(path, weights_dir)
    with pytest.raises(ValueError, match=message) as info:
        METHODS["safetensors_lazy"](path, CFG, "cpu")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_width_without_config_says_what_to_pass(tmp_path, weights_dir):
    with pytest.raises(ValueError, match=r"tiny.pth: .*n_heads.* Or pass the model's config"):
        METHODS["naive"](weights_dir / "tiny.pth")


#####################################
# The benchmark script
#####################################

def test_benchmark_runs_methods_in_subprocesses(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path), "--methods", "naive", "mmap",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["naive", "mmap"]
    assert all(r["peak_rss"] >= r["rss_before"] > 0 for r in rows)
    assert format_table(rows) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "result.json", "tiny.pth", "tiny.safetensors"]


def test_worker_peak_is_its_own_not_the_parents(weights_dir):
    """A child process must not report the parent's memory (ru_maxrss survives fork + exec)."""
    from memory_efficient_loading import _vm_kib

    ballast = torch.ones(768 * 1024 * 1024 // 4)  # 768 MiB, touched, in this (the parent) process
    parent_rss = _vm_kib("VmRSS") * 1024
    row = run_in_subprocess("naive", weights_dir, "tiny", "cpu")
    assert row["peak_rss"] < parent_rss - 512 * 1024 * 1024, (row["peak_rss"], parent_rss)
    del ballast


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fault", ["truncated", "garbage", "wrong shape"])
def test_benchmark_refuses_a_damaged_or_foreign_weights_file(fault, weights_dir, tmp_path, capsys):
    write, _ = PTH_FAULTS[fault]
    write(tmp_path / "tiny.pth", weights_dir)
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path), "--methods", "naive"]) == 2
    err = _one_error_line(capsys)
    assert "tiny.pth" in err and "Delete it" in err
    assert not (tmp_path / "tiny.safetensors").exists()  # nothing built from the bad file


def test_benchmark_refuses_a_truncated_safetensors_file(weights_dir, tmp_path, capsys):
    (tmp_path / "tiny.pth").write_bytes((weights_dir / "tiny.pth").read_bytes())
    _truncated(tmp_path / "tiny.safetensors", weights_dir, ".safetensors")
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path), "--methods", "safetensors_lazy"]) == 2
    assert "tiny.safetensors is not a readable safetensors file" in _one_error_line(capsys)


def test_a_failing_worker_is_one_line(weights_dir, tmp_path, capsys, monkeypatch):
    """A fault that appears between the check and the measurement (here: the file is
    replaced) is reported by the worker as one line, which the parent passes on."""
    import benchmark_weight_loading

    monkeypatch.setattr(benchmark_weight_loading, "check_weights_files", lambda *a: None)
    _truncated(tmp_path / "tiny.pth", weights_dir, ".pth")
    (tmp_path / "tiny.safetensors").write_bytes((weights_dir / "tiny.safetensors").read_bytes())
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path), "--methods", "mmap"]) == 2
    err = _one_error_line(capsys)
    assert "method mmap failed" in err and "tiny.pth is not a readable PyTorch checkpoint" in err


def test_weights_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)


def test_json_path_in_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path), "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "does not exist or is not writable" in _one_error_line(capsys)
    assert not (tmp_path / "tiny.pth").exists()


def test_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    from ch05_utils import RunLock

    with RunLock(tmp_path, LOCK_NAME):  # a benchmark running on this folder
        assert main(["--model", "tiny", "--weights-dir", str(tmp_path)]) == 2
    assert "is in use by a running job" in _one_error_line(capsys)
    assert not (tmp_path / "tiny.pth").exists()


def test_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    (tmp_path / LOCK_NAME).write_text("pid 999999")  # the OS released the lock when that run died
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path), "--methods", "naive"]) == 0


def test_sigterm_stops_cleanly_and_leaves_no_worker(tmp_path):
    proc = subprocess.Popen([sys.executable, str(FOLDER / "benchmark_weight_loading.py"), "--model", "tiny",
                             "--weights-dir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                            cwd=FOLDER, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("tiny.safetensors")) and time.time() < deadline:
        time.sleep(0.2)  # the weights are written: the workers start now
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
    children = subprocess.run(["pgrep", "-f", f"--weights-dir {tmp_path}"], capture_output=True, text=True)
    assert children.stdout.strip() == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_dies_with_a_killed_parent(tmp_path):
    """Even `kill -9` of the benchmark must not leave a worker holding gigabytes."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys\n"
        f"sys.path.insert(0, {str(FOLDER)!r})\n"
        "from benchmark_weight_loading import _die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " preexec_fn=_die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")


def test_benchmark_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--device", "cuda", "--model", "tiny"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda")


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "peak RSS" in capsys.readouterr().out


def test_too_little_disk_space_is_refused_before_writing(tmp_path, capsys, monkeypatch):
    import shutil

    import memory_efficient_loading

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(memory_efficient_loading.shutil, "disk_usage",
                        lambda path: usage._replace(free=1024 * 1024))  # 1 MiB free
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path)]) == 2
    assert "GiB free, but the weights need" in _one_error_line(capsys)
    assert not (tmp_path / "tiny.pth").exists()
