"""Bad files and bad command-line values get one clear error that names the file or flag.

One test per fault. Each damages a real (tiny) checkpoint, tokenizer or settings file
the way a broken download or a typo would, and checks the error's type and that its
message names the culprit and says what to do.
"""

import json

import pytest
import torch
from llama3 import (
    LlamaTokenizer,
    Llama3Tokenizer,
    Llama3Model,
    config_from_hf,
    load_llama_checkpoint,
    load_weights_into_llama,
    read_access_token,
)
from safetensors.torch import save_file
from tiny_llama_checkpoint import make_tiny_llama3_checkpoint


@pytest.fixture()
def checkpoint(tmp_path):
    """A complete tiny Llama 3.2 folder (config.json, model.safetensors, original/tokenizer.model)."""
    return make_tiny_llama3_checkpoint(tmp_path / "ckpt", n_merges=20)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None
    return message


def test_config_json_missing_a_key(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["num_hidden_layers"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_llama_checkpoint(checkpoint)
    assert str(checkpoint / "config.json") in one_line(err) and "num_hidden_layers" in str(err.value)


def test_config_json_truncated(checkpoint):
    text = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="is not valid JSON.*download the checkpoint again") as err:
        load_llama_checkpoint(checkpoint)
    assert str(checkpoint / "config.json") in one_line(err)


def test_config_json_of_another_kind_of_model(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    config.pop("rope_parameters", None)
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="yarn.*not a Llama 2/3 RoPE") as err:
        load_llama_checkpoint(checkpoint)
    assert "config.json" in one_line(err)


def test_config_json_with_a_nonsense_value(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = -2
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json.*'n_layers' must be a positive integer, got -2") as err:
        load_llama_checkpoint(checkpoint)
    one_line(err)


def test_weights_file_truncated(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a complete safetensors file.*download it again") as err:
        load_llama_checkpoint(checkpoint, dtype=torch.float32)
    assert str(weights) in one_line(err)


def test_weights_file_is_garbage(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"<html>502 Bad Gateway</html>" * 10)
    with pytest.raises(ValueError, match="not a complete safetensors file") as err:
        load_llama_checkpoint(checkpoint, dtype=torch.float32)
    assert "model.safetensors" in one_line(err)


def test_weights_of_another_model(checkpoint):
    """GPT-2's tensors under a Llama config.json: nothing fits, and the error says so."""
    save_file({"transformer.wte.weight": torch.zeros(4, 4), "transformer.h.0.attn.c_attn.weight": torch.zeros(4, 12)},
              str(checkpoint / "model.safetensors"))
    with pytest.raises(ValueError, match="not a Llama checkpoint") as err:
        load_llama_checkpoint(checkpoint, dtype=torch.float32)
    assert "transformer.wte.weight" in one_line(err)


def test_state_dict_of_another_model_into_load_weights_into_llama(checkpoint):
    cfg = config_from_hf(json.loads((checkpoint / "config.json").read_text()), dtype=torch.float32)
    model = Llama3Model(cfg)
    with pytest.raises(ValueError, match="not a Llama checkpoint") as err:
        load_weights_into_llama(model, cfg, {"tok_emb.weight": torch.zeros(3), "pos_emb.weight": torch.zeros(3)})
    one_line(err)


def test_shard_index_damaged(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match="index.json is not a safetensors index") as err:
        load_llama_checkpoint(checkpoint)
    one_line(err)


def test_shard_missing(tmp_path):
    folder = make_tiny_llama3_checkpoint(tmp_path / "sharded", n_merges=20, n_shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors.*Download the checkpoint again"):
        load_llama_checkpoint(folder)


def test_llama3_tokenizer_file_empty(checkpoint):
    path = checkpoint / "original" / "tokenizer.model"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty; download the tokenizer again") as err:
        Llama3Tokenizer(path)
    assert str(path) in one_line(err)


def test_llama2_tokenizer_file_is_not_sentencepiece(checkpoint):
    path = checkpoint / "original" / "tokenizer.model"  # a tiktoken file given to Llama 2's tokenizer
    with pytest.raises(ValueError, match="is not a sentencepiece model") as err:
        LlamaTokenizer(str(path))
    assert str(path) in one_line(err)


@pytest.mark.parametrize("content,expected", [
    ('{"_comment": "no token"}', "no access token under HF_ACCESS_TOKEN"),
    ('{"HF_ACCESS_TOKEN": "hf-..."}', "no access token under HF_ACCESS_TOKEN.*'hf-...'"),
    ('{"HF_ACCESS_TOKEN": ', "is not a JSON object"),
])
def test_access_token_config_json(tmp_path, monkeypatch, content, expected):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=expected) as err:
        read_access_token(path)
    assert str(path) in one_line(err)
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    assert read_access_token(path) == "hf_from_the_environment"


@pytest.mark.parametrize("argv,flag", [
    (["--prompt-len", "0"], "--prompt-len must be >= 1"),
    (["--new-tokens", "nan"], "--new-tokens: invalid int value: 'nan'"),
    (["--new-tokens", "inf"], "--new-tokens: invalid int value: 'inf'"),
    (["--prompt-len", "131000", "--new-tokens", "100"], "at most 131,072"),
    (["--repeats", "-3"], "--repeats must be between 1 and 100"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--size", "huge"], "--"),
])
def test_benchmark_rejects_bad_numbers_before_building_anything(argv, flag, capsys):
    from benchmark_llama import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("benchmark_llama.py: error: ") and flag in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_config_json_that_is_a_list(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="holds a JSON list, not a model config") as err:
        load_llama_checkpoint(checkpoint)
    assert "config.json" in one_line(err)


def test_benchmark_interrupted_exits_without_a_traceback(monkeypatch, capsys):
    import benchmark_llama

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark_llama, "benchmark_generation", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        benchmark_llama.main(["--threads", "1"])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
