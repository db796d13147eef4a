"""Every way into GPTModel gives Hugging Face's logits; exporting and importing is lossless.

The reference is a small random `transformers` GPT2LMHeadModel (the real GPT-2 weights
cannot be downloaded here); every one of its tensors has random values, so a weight in
the wrong place, untransposed or mis-split changes the logits.
"""

import json
import struct

import pytest
import torch
from convert_gpt2_weights import (
    WeightFormatError,
    build_gpt,
    detect_format,
    gpt_to_hf_state_dict,
    hf_to_gpt_state_dict,
    load_hf,
    load_openai,
    load_pth,
    main,
    read_safetensors,
    save_hf,
)
from previous_chapters import GPTModel
from safetensors.torch import save_file

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """A tiny random GPT-2 in OpenAI's checkpoint layout, plus the same model saved by transformers."""
    from openai_checkpoint import write_openai_checkpoint

    root = tmp_path_factory.mktemp("gpt2")
    hf_model = write_openai_checkpoint(root / "openai")
    hf_model.save_pretrained(root / "hf")
    return hf_model, root


@pytest.fixture(scope="module")
def token_ids():
    torch.manual_seed(1)
    return torch.randint(0, 50257, (2, 20))


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)


def test_hf_folder_gives_the_same_logits(hf_reference, token_ids):
    hf_model, root = hf_reference
    state_dict, cfg = load_hf(root / "hf")
    assert cfg["qkv_bias"] and cfg["n_layers"] == 2 and cfg["context_length"] == 64
    diff = (our_logits(build_gpt(state_dict, cfg), token_ids) - hf_logits(hf_model, token_ids)).abs().max()
    assert diff < TOL


def test_hub_file_layout_without_prefix_and_with_mask_buffers(hf_reference, token_ids, tmp_path):
    """openai-community/gpt2's own model.safetensors names tensors `h.0...` and carries
    the old causal-mask buffers `h.N.attn.bias`; both must be handled."""
    hf_model, root = hf_reference
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf_model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((root / "hf" / "config.json").read_text())
    state_dict, cfg = load_hf(tmp_path)
    diff = (our_logits(build_gpt(state_dict, cfg), token_ids) - hf_logits(hf_model, token_ids)).abs().max()
    assert diff < TOL


def test_transformers_model_state_dict_gives_the_same_logits(hf_reference, token_ids):
    hf_model, _ = hf_reference
    cfg = {"vocab_size": 50257, "context_length": 64, "emb_dim": 48, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    state_dict = hf_to_gpt_state_dict(hf_model.state_dict(), cfg["n_layers"])
    diff = (our_logits(build_gpt(state_dict, cfg), token_ids) - hf_logits(hf_model, token_ids)).abs().max()
    assert diff < TOL


def test_openai_checkpoint_gives_the_same_logits(hf_reference, token_ids):
    hf_model, root = hf_reference
    assert detect_format(str(root / "openai")) == "openai"
    state_dict, cfg = load_openai(root / "openai")
    diff = (our_logits(build_gpt(state_dict, cfg), token_ids) - hf_logits(hf_model, token_ids)).abs().max()
    assert diff < TOL


def test_openai_to_hf_to_pth_through_the_command_line(hf_reference, token_ids, tmp_path, capsys):
    hf_model, root = hf_reference
    assert main([str(root / "openai"), str(tmp_path / "hf"), "--to", "hf", "--verify"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert main([str(tmp_path / "hf"), str(tmp_path / "model.pth")]) == 0
    checkpoint = torch.load(tmp_path / "model.pth", weights_only=True)
    model = build_gpt(checkpoint["model"], checkpoint["config"])
    assert (our_logits(model, token_ids) - hf_logits(hf_model, token_ids)).abs().max() < TOL


def test_bare_state_dict_with_legacy_masks(hf_reference, token_ids, tmp_path):
    """The course's older .pth files are bare state dicts that include the causal masks."""
    hf_model, root = hf_reference
    state_dict, cfg = load_hf(root / "hf")
    legacy = dict(state_dict)
    for i in range(cfg["n_layers"]):
        legacy[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(64, 64), diagonal=1).bool()
    torch.save(legacy, tmp_path / "legacy.pth")
    loaded, inferred = load_pth(tmp_path / "legacy.pth", n_heads=4)
    assert inferred == {**cfg, "drop_rate": 0.1}
    diff = (our_logits(build_gpt(loaded, inferred), token_ids) - hf_logits(hf_model, token_ids)).abs().max()
    assert diff < TOL


def test_bare_state_dict_of_unknown_width_needs_n_heads(hf_reference, tmp_path):
    _, root = hf_reference
    state_dict, _ = load_hf(root / "hf")
    torch.save(state_dict, tmp_path / "bare.pth")
    with pytest.raises(WeightFormatError, match="--n-heads"):
        load_pth(tmp_path / "bare.pth")


#####################################
# Export of a gpt_train.py model
#####################################

@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A real gpt_train.py run (tiny model, 3 steps): untied head, no qkv biases, context 32."""
    import gpt_train

    out = tmp_path_factory.mktemp("train")
    assert gpt_train.main(["--model", "tiny", "--max-steps", "3", "--output-dir", str(out), "--no-progress",
                           "--eval-freq", "100", "--device", "cpu"]) == 0
    return out / "checkpoint.pth"


def test_export_of_trained_model_loads_in_transformers_with_the_same_logits(trained_checkpoint, tmp_path):
    from transformers import GPT2LMHeadModel

    assert main([str(trained_checkpoint), str(tmp_path / "export"), "--to", "hf"]) == 0
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    ours = build_gpt(checkpoint["model"], checkpoint["config"])
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert not hf_model.config.tie_word_embeddings  # gpt_train.py's head is its own matrix
    idx = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(0))
    assert (our_logits(ours, idx) - hf_logits(hf_model, idx)).abs().max() < TOL


def test_export_then_import_is_exact(trained_checkpoint, tmp_path):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    save_hf(checkpoint["model"], checkpoint["config"], tmp_path)
    state_dict, cfg = load_hf(tmp_path)
    assert cfg == checkpoint["config"]
    assert state_dict.keys() == checkpoint["model"].keys()
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(state_dict[name], tensor), name


def test_conversions_are_inverse_for_a_tied_model_with_biases():
    cfg = {"vocab_size": 100, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 3,
           "drop_rate": 0.0, "qkv_bias": True}
    torch.manual_seed(0)
    model = GPTModel(cfg)
    model.out_head.weight = model.tok_emb.weight
    hf = gpt_to_hf_state_dict(model.state_dict(), cfg)
    assert "lm_head.weight" not in hf  # tied: config.json says so instead
    back = hf_to_gpt_state_dict(hf, cfg["n_layers"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name


#####################################
# Bad files
#####################################

@pytest.fixture
def hf_files(hf_reference, tmp_path):
    """A copy of the tiny model's Hugging Face files to damage."""
    _, root = hf_reference
    (tmp_path / "config.json").write_text((root / "hf" / "config.json").read_text())
    return tmp_path, read_safetensors(root / "hf" / "model.safetensors")


def test_truncated_safetensors(hf_reference, tmp_path):
    _, root = hf_reference
    data = (root / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFormatError, match="truncated"):
        read_safetensors(tmp_path / "model.safetensors")


def test_truncated_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b'{"a":')
    with pytest.raises(WeightFormatError, match="not a complete safetensors file"):
        read_safetensors(tmp_path / "model.safetensors")


def test_wrong_dtype_names_the_tensor(hf_files):
    folder, sd = hf_files
    sd["transformer.h.1.mlp.c_fc.bias"] = sd["transformer.h.1.mlp.c_fc.bias"].to(torch.int32)
    save_file(sd, folder / "model.safetensors")
    state_dict, cfg = load_hf(folder)
    with pytest.raises(WeightFormatError, match=r"'trf_blocks.1.ff.layers.0.bias' has dtype torch.int32"):
        build_gpt(state_dict, cfg)


def test_missing_tensor_is_named(hf_files):
    folder, sd = hf_files
    del sd["transformer.h.1.ln_2.bias"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(WeightFormatError, match=r"Missing tensor 'h.1.ln_2.bias'"):
        load_hf(folder)


def test_unexpected_tensor_is_named(hf_files):
    folder, sd = hf_files
    sd["transformer.h.2.ln_1.weight"] = torch.ones(48)  # a third block config.json does not have
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(WeightFormatError, match=r"Unexpected tensor 'h.2.ln_1.weight'"):
        load_hf(folder)


def test_wrong_shape_is_named(hf_files):
    folder, sd = hf_files
    config = json.loads((folder / "config.json").read_text())
    config["n_positions"] = 128  # the file's wpe has 64 rows
    (folder / "config.json").write_text(json.dumps(config))
    save_file(sd, folder / "model.safetensors")
    state_dict, cfg = load_hf(folder)
    with pytest.raises(WeightFormatError, match=r"'pos_emb.weight' has shape \(64, 48\).*\(128, 48\)"):
        build_gpt(state_dict, cfg)


def test_config_without_gpt2_fields_is_rejected(hf_files):
    folder, sd = hf_files
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(WeightFormatError, match="lacks n_positions, n_embd, n_head, n_layer"):
        load_hf(folder)


def test_unexpected_key_in_our_state_dict_is_named(trained_checkpoint):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["model"]["trf_blocks.0.att.rotary"] = torch.zeros(3)
    with pytest.raises(WeightFormatError, match=r"Unexpected tensor 'trf_blocks.0.att.rotary'"):
        build_gpt(checkpoint["model"], checkpoint["config"])


@pytest.mark.parametrize("argv, message", [
    (["no/such/file.pth", "out.pth"], "No .pth file"),
    (["./missing-folder", "out.pth"], "does not exist"),
    (["x.pth", "out"], "must be a .pth file"),
    (["x.pth", "out.json", "--to", "hf"], "output is a folder"),
])
def test_command_line_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "Hugging Face" in capsys.readouterr().out
