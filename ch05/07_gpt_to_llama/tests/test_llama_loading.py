"""Loading Hugging Face safetensors checkpoints, and the errors for bad ones."""

import json

import huggingface_hub
import pytest
import torch
from llama3 import (
    LLAMA32_CONFIG_3B,
    Llama3Model,
    config_from_hf,
    download_llama_checkpoint,
    hf_to_our_name,
    load_llama_checkpoint,
    load_llama_from_safetensors,
    safetensors_files,
)
from safetensors.torch import load_file, save_file
from tiny_llama_checkpoint import hf_llama_config
from transformers import LlamaForCausalLM


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """A tiny Llama 3.2 saved in several shards with an index, as the 3B and 8B models are."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_llama_config("3.2", 300)).eval()
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    return model, folder


def test_sharded_checkpoint_loads_in_bfloat16_and_float32(sharded_checkpoint):
    hf_model, folder = sharded_checkpoint
    assert len(safetensors_files(folder)) > 1
    idx = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(idx).logits
        fp32 = load_llama_checkpoint(folder, dtype=torch.float32)(idx)
        bf16_model = load_llama_checkpoint(folder, dtype=torch.bfloat16, context_length=64)
        bf16 = bf16_model(idx)
    torch.testing.assert_close(fp32, expected, rtol=0, atol=1e-5)
    assert bf16_model.tok_emb.weight.dtype == torch.bfloat16 and bf16_model.cos.shape[0] == 64
    assert (bf16.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert all(not p.is_meta and not p.requires_grad for p in bf16_model.parameters())


def _single_file(tmp_path, tensors, hf_config):
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    return tmp_path


def test_wrong_config_missing_and_extra_tensors_are_explained(sharded_checkpoint, tmp_path):
    hf_model, _ = sharded_checkpoint
    tensors = {k: v.clone() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    hf_config = hf_model.config.to_dict()
    cfg = config_from_hf(hf_config, dtype=torch.float32)
    good = _single_file(tmp_path / "good", tensors, hf_config)
    assert load_llama_checkpoint(good).out_head.weight is not None

    with pytest.raises(ValueError, match="Shape mismatch in tensor 'model.embed_tokens.weight'.*config does not fit"):
        load_llama_from_safetensors({**cfg, "emb_dim": 128, "hidden_dim": 256}, safetensors_files(good))
    with pytest.raises(ValueError, match="layer.*beyond the model's n_layers=1"):
        load_llama_from_safetensors({**cfg, "n_layers": 1}, safetensors_files(good))
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        load_llama_from_safetensors({**cfg, "n_layers": 2},
                                    [_single_file(tmp_path / "gap", {k: v for k, v in tensors.items()
                                                                    if "layers.1.mlp.up_proj" not in k},
                                                  hf_config) / "model.safetensors"])
    # Tensors that are not Llama weights are ignored, as by the book's load_weights_into_llama.
    extra = _single_file(tmp_path / "odd", {**tensors, "vision_model.x": torch.ones(1)}, hf_config)
    assert load_llama_from_safetensors(cfg, safetensors_files(extra)).cfg["n_layers"] == 2
    with pytest.raises(ValueError, match="lacks 234 tensor.*more layers than the checkpoint"):
        load_llama_from_safetensors({**LLAMA32_CONFIG_3B, "dtype": torch.float32}, safetensors_files(good))
    with pytest.raises(FileNotFoundError, match="Checkpoint files missing"):
        safetensors_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama_checkpoint(tmp_path)


def test_untied_checkpoint_without_head_gets_tied_as_in_the_book(sharded_checkpoint, tmp_path, capsys):
    hf_model, _ = sharded_checkpoint
    tensors = {k: v.clone() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    hf_config = {**hf_model.config.to_dict(), "tie_word_embeddings": False}
    model = load_llama_checkpoint(_single_file(tmp_path, tensors, hf_config))
    assert model.out_head.weight is model.tok_emb.weight
    assert "Model uses weight tying." in capsys.readouterr().out
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    model = load_llama_checkpoint(_single_file(tmp_path, tensors, hf_config), dtype=torch.float32)
    assert model.out_head.weight is not model.tok_emb.weight
    assert torch.equal(model.out_head.weight, load_file(str(tmp_path / "model.safetensors"))["lm_head.weight"])


def test_missing_access_token_is_explained(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="gated.*HF_TOKEN"):
        download_llama_checkpoint("meta-llama/Llama-3.2-1B-Instruct")


def test_gated_and_offline_errors_are_explained(monkeypatch):
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    def gated(*args, **kwargs):
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "403 gated")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PermissionError, match="no access to meta-llama/Llama-3.2-3B-Instruct.*accept"):
        download_llama_checkpoint("meta-llama/Llama-3.2-3B-Instruct", token="hf_test")

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match="Could not reach Hugging Face"):
        download_llama_checkpoint(token="hf_test")


def test_benchmark_name_mapping_inverts_the_loader_mapping():
    from benchmark_llama import SIZES, our_to_hf_name

    with torch.device("meta"):
        model = Llama3Model({**SIZES["small"], "n_layers": 2, "context_length": 8})
    names = [name for name, _ in model.named_parameters()]
    assert [hf_to_our_name(our_to_hf_name(name)) for name in names] == names
    assert our_to_hf_name("trf_blocks.1.ff.fc1.weight") == "model.layers.1.mlp.gate_proj.weight"


def test_benchmark_generation_runs_every_variant(capsys):
    from benchmark_llama import main

    main(["--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith("x")]
    assert len(rows) == 4 and rows[0].rstrip().endswith("1.00x")


@pytest.mark.slow
def test_benchmark_loading_measures_both_ways(capsys):
    from benchmark_llama import main

    main(["--loading", "--threads", "1"])
    out = capsys.readouterr().out
    assert "naive       loading: peak memory rose by" in out and "low-memory  loading" in out
