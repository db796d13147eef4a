"""Every memory-efficient method loads exactly the weights naive loading does, with working masks."""

import json

import pytest
import torch
from benchmark_weight_loading import format_table, main, run_in_subprocess
from memory_efficient_loading import (
    METHODS,
    MODEL_CONFIGS,
    PeakMemory,
    check_fully_loaded,
    load_naive,
    rebuild_causal_masks,
    save_random_weights,
    weights_file_for,
)
from previous_chapters import GPTModel

CFG = MODEL_CONFIGS["tiny"]


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


def test_random_weights_are_those_of_a_seeded_model(weights_dir):
    torch.manual_seed(123)
    expected = GPTModel(CFG).state_dict()
    saved = torch.load(weights_dir / "tiny.pth", weights_only=True)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_loads_the_same_weights_and_logits(method, weights_dir, reference):
    ref_model, idx, ref_logits = reference
    model = METHODS[method](weights_file_for(method, weights_dir, "tiny"), CFG, "cpu")
    check_fully_loaded(model)
    ref_state = ref_model.state_dict()
    assert model.state_dict().keys() == ref_state.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    for block, ref_block in zip(model.trf_blocks, ref_model.trf_blocks, strict=True):
        assert torch.equal(block.att.mask, ref_block.att.mask)  # the non-persistent buffer, rebuilt
    assert not model.training
    with torch.no_grad():
        assert (model(idx) - ref_logits).abs().max() < 1e-5


def test_meta_loading_without_rebuilding_masks_is_caught(weights_dir):
    with torch.device("meta"):
        model = GPTModel(CFG)
    model.load_state_dict(torch.load(weights_dir / "tiny.pth", weights_only=True), assign=True)
    with pytest.raises(RuntimeError, match=r"trf_blocks.0.att.mask was never loaded"):
        check_fully_loaded(model)
    rebuild_causal_masks(model, "cpu")
    check_fully_loaded(model)
    assert torch.equal(model.trf_blocks[0].att.mask, GPTModel(CFG).trf_blocks[0].att.mask)


def test_safetensors_file_with_a_foreign_tensor_is_rejected(weights_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights_dir / "tiny.safetensors")
    tensors["trf_blocks.9.att.W_query.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(KeyError, match="trf_blocks.9.att.W_query.weight"):
        METHODS["safetensors_lazy"](tmp_path / "bad.safetensors", CFG, "cpu")


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory() as memory:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, written so that its pages are resident
        del block
    assert memory.added_rss > 48 * 1024 * 1024
    assert memory.gpu_peak is None and memory.seconds >= 0


def test_benchmark_runs_methods_in_subprocesses(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["--model", "tiny", "--weights-dir", str(tmp_path), "--methods", "naive", "mmap",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["naive", "mmap"]
    assert all(r["peak_rss"] >= r["rss_before"] > 0 for r in rows)
    assert format_table(rows) in capsys.readouterr().out


def test_worker_peak_is_its_own_not_the_parents(weights_dir):
    """A child process must not report the parent's memory (ru_maxrss survives fork + exec)."""
    from memory_efficient_loading import _vm_kib

    ballast = torch.ones(768 * 1024 * 1024 // 4)  # 768 MiB, touched, in this (the parent) process
    parent_rss = _vm_kib("VmRSS") * 1024
    row = run_in_subprocess("naive", weights_dir, "tiny", "cpu")
    assert row["peak_rss"] < parent_rss - 512 * 1024 * 1024, (row["peak_rss"], parent_rss)
    del ballast


def test_benchmark_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--device", "cuda", "--model", "tiny"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda")
