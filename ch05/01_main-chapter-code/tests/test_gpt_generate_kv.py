"""gpt_generate.py with the KV cache (the default): the chapter's text, faster; --int8 and its refusals."""

import argparse

import gpt_generate
import pytest
import torch
from ch05_utils import save_checkpoint_atomic
from previous_chapters import GPT_CONFIG_124M, GPTModel, get_tokenizer

PROMPT = "Every effort moves you"
TINY = {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2}


@pytest.fixture(autouse=True)
def plain_pytorch(monkeypatch):
    """No torch.compile here: a minute per model shape on a busy machine (06's tests cover it)."""
    monkeypatch.setenv("CH05_COMPILE", "0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model saved as gpt_train.py saves it."""
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    path = tmp_path_factory.mktemp("kv") / "checkpoint.pth"
    save_checkpoint_atomic({"model": model.state_dict(), "config": TINY}, path)
    return model, path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = gpt_generate.cli([*args, "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "1.3", "--top-k", "20", "--seed", "5"],
                                      ["--temperature", "0.8", "--top-k", "0", "--seed", "9"]])
def test_the_kv_cache_prints_the_chapters_text(tiny, capsys, sampling):
    """40 new tokens on a 32-token context: the window slides, in both paths alike."""
    _, path = tiny
    args = ["--checkpoint", str(path), "--prompt", PROMPT, "--max-new-tokens", "40", *sampling]
    code, cached, err = run(capsys, *args)
    assert code == 0 and "KV cache" in err
    code, chapter, err = run(capsys, *args, "--no-kv-cache")
    assert code == 0 and "the chapter's generate" in err
    assert cached == chapter and len(cached) > len(PROMPT) + 10


def test_both_streams_stop_at_the_end_token_without_printing_it(tiny):
    model, _ = tiny
    ids = torch.tensor([get_tokenizer().encode(PROMPT)])
    args = argparse.Namespace(seed=3, max_new_tokens=20, temperature=1.0, top_k=None, int8=False, compile=False)
    free = list(gpt_generate.stream_tokens_kv(model, ids, args, eos_id=-1))
    stop = free[5]
    expected = free[:free.index(stop)]
    assert list(gpt_generate.stream_tokens_kv(model, ids, args, eos_id=stop)) == expected
    assert list(gpt_generate.stream_tokens(model, ids, args, eos_id=stop)) == expected


def test_int8_generates_text(tiny, capsys):
    _, path = tiny
    code, out, err = run(capsys, "--checkpoint", str(path), "--prompt", PROMPT, "--max-new-tokens", "10",
                         "--temperature", "0", "--int8")
    assert code == 0 and "int8 weights" in err
    assert out.startswith(PROMPT) and len(out) > len(PROMPT) + 1


def test_int8_refuses_a_model_it_cannot_quantize(tiny, tmp_path, capsys):
    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["trf_blocks.1.ff.layers.2.weight"][3, 4] = float("nan")
    save_checkpoint_atomic({"model": state, "config": TINY}, tmp_path / "nan.pth")
    code, out, err = run(capsys, "--checkpoint", str(tmp_path / "nan.pth"), "--int8")
    assert code == 2 and out == ""
    assert err.startswith("error: int8 mode: trf_blocks.1.ff.layers.2.weight holds NaN") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--no-kv-cache", "--int8"], "--int8 and --compile work on the KV-cache path"),
    (["--no-kv-cache", "--compile"], "--int8 and --compile work on the KV-cache path"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--temperature", "inf"], "--temperature must be a number >= 0"),
])
def test_bad_combinations_are_one_line_errors(args, message, capsys):
    code, _, err = run(capsys, *args)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
