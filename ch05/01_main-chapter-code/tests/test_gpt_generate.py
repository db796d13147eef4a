"""gpt_generate.py: the CLI end to end, against the local GPT-2 server and against a
checkpoint from gpt_train.py; the streamed text equals what `generate` produces."""

import os
import subprocess
import sys
from pathlib import Path

import gpt_generate
import pytest
import torch
from ch05_utils import generate, load_checkpoint
from gpt_download import config_from_hparams, download_and_load_gpt2, load_weights_into_gpt
from previous_chapters import GPTModel, get_tokenizer

HERE = Path(gpt_generate.__file__).resolve().parent
PROMPT = "Every effort moves you"


def run_script(script: str, *args: str, env_extra: dict | None = None, cwd: Path | None = None):
    env = {**os.environ, **(env_extra or {})}  # keeps CH05_DATA_DIR and TIKTOKEN_CACHE_DIR (offline data)
    return subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def continuation(model, prompt: str, max_new_tokens: int, **sampling) -> str:
    """What the chapter's `generate` makes of `prompt`, stopped at <|endoftext|> like the CLI."""
    tokenizer = get_tokenizer()
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, ids, max_new_tokens=max_new_tokens, context_size=model.pos_emb.weight.shape[0],
                   **sampling)[0, ids.shape[1]:].tolist()
    if tokenizer.eot_token in out:
        out = out[:out.index(tokenizer.eot_token)]
    return tokenizer.decode(out)


@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_test_server, tmp_path_factory):
    """The test server's GPT-2, downloaded into a models folder, and loaded."""
    models_dir = tmp_path_factory.mktemp("gpt2")
    settings, params = download_and_load_gpt2("124M", models_dir, base_url=gpt2_test_server.base_url,
                                              progress=False)
    model = GPTModel(config_from_hparams(settings))
    load_weights_into_gpt(model, params)
    return models_dir, model.eval()


def test_cli_downloads_gpt2_and_prints_hugging_faces_greedy_text(gpt2_test_server, tmp_path):
    ids = torch.tensor([get_tokenizer().encode(PROMPT)])
    hf_ids = gpt2_test_server.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                                do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    result = run_script("gpt_generate.py", "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "12",
                        "--models-dir", str(tmp_path / "gpt2"), "--device", "cpu",
                        env_extra={"GPT2_BASE_URL": gpt2_test_server.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + get_tokenizer().decode(hf_ids) + "\n"
    assert (tmp_path / "gpt2" / "124M" / "model.ckpt.index").is_file()
    assert "GPT-2 124M on cpu" in result.stderr


def test_streamed_samples_equal_one_generate_call(tiny_gpt2, capsys):
    models_dir, model = tiny_gpt2
    args = ["--prompt", PROMPT, "--models-dir", str(models_dir), "--max-new-tokens", "15", "--temperature", "1.5",
            "--top-k", "20", "--seed", "7", "--device", "cpu"]
    assert gpt_generate.cli(args) == 0
    first = capsys.readouterr().out
    expected = continuation(model, PROMPT, 15, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(7))
    assert first == PROMPT + expected + "\n"
    assert gpt_generate.cli(args) == 0
    assert capsys.readouterr().out == first  # the same seed gives the same text
    assert gpt_generate.cli([*args[:-4], "--seed", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out != first


def test_an_empty_prompt_starts_a_new_document(tiny_gpt2, capsys):
    models_dir, _ = tiny_gpt2
    assert gpt_generate.cli(["--prompt", "", "--models-dir", str(models_dir), "--max-new-tokens", "5",
                              "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    result = run_script("gpt_train.py", "--model", "tiny", "--num-epochs", "1", "--max-steps", "10",
                        "--eval-freq", "5", "--eval-iter", "1", "--output-dir", str(out), "--no-progress",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return out / "checkpoint.pth"


def test_cli_generates_with_a_gpt_train_checkpoint(trained_checkpoint):
    result = run_script("gpt_generate.py", "--checkpoint", str(trained_checkpoint), "--prompt", PROMPT,
                        "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(trained_checkpoint)
    model = GPTModel(checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    assert result.stdout == PROMPT + continuation(model.eval(), PROMPT, 20) + "\n"
    assert str(trained_checkpoint) in result.stderr


def test_cli_generates_with_the_books_model_pth(trained_checkpoint, tmp_path):
    """The book saves `torch.save(model.state_dict(), "model.pth")`: weights only, no config."""
    checkpoint = load_checkpoint(trained_checkpoint)
    model = GPTModel(checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    torch.save(model.state_dict(), tmp_path / "model.pth")
    args = ["--checkpoint", str(tmp_path / "model.pth"), "--prompt", PROMPT, "--temperature", "0",
            "--max-new-tokens", "20", "--device", "cpu"]
    refused = run_script("gpt_generate.py", *args)  # the tiny model's width is not GPT-2's: heads unknown
    assert refused.returncode == 2 and "pass it (n_heads / --n-heads)" in refused.stderr
    result = run_script("gpt_generate.py", *args, "--n-heads", str(checkpoint["config"]["n_heads"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + continuation(model.eval(), PROMPT, 20) + "\n"


def test_text_pieces_never_split_a_character():
    tokenizer = get_tokenizer()
    text = "naïve café 🙂 — 東京"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens are partial characters
    pieces = list(gpt_generate.text_pieces(ids, tokenizer))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--checkpoint", "no/such/checkpoint.pth"], "No model file at no/such/checkpoint.pth"),
    (["--device", "tpu"], "Unknown device 'tpu'"),
])
def test_bad_input_is_a_one_line_error(args, message, capsys):
    assert gpt_generate.cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_unknown_model_size_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as excinfo:
        gpt_generate.cli(["--model-size", "2B"])
    assert excinfo.value.code == 2
    assert "invalid choice: '2B'" in capsys.readouterr().err


def test_no_network_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import gpt_download

    monkeypatch.setattr(gpt_download, "RETRY_BACKOFF_S", 0.0)
    monkeypatch.setenv("GPT2_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert gpt_generate.cli(["--models-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "error: Could not get checkpoint of GPT-2 124M" in capsys.readouterr().err
