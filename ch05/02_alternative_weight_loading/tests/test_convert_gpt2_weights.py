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
    load_any,
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


@pytest.mark.parametrize("masks", ["float (the book's)", "bool", "none (older files of ours)"])
def test_bare_state_dict_with_or_without_masks(masks, hf_reference, token_ids, tmp_path):
    """The book's model.pth holds float masks; older files of ours held bool masks or none."""
    hf_model, root = hf_reference
    state_dict, cfg = load_hf(root / "hf")
    for i in range(cfg["n_layers"]):
        mask = torch.triu(torch.ones(64, 64), diagonal=1)
        if masks == "bool":
            state_dict[f"trf_blocks.{i}.att.mask"] = mask.bool()
        elif masks.startswith("none"):
            del state_dict[f"trf_blocks.{i}.att.mask"]
        else:
            assert torch.equal(state_dict[f"trf_blocks.{i}.att.mask"], mask)
    torch.save(state_dict, tmp_path / "model.pth")
    loaded, inferred = load_pth(tmp_path / "model.pth", n_heads=4)
    assert inferred == {**cfg, "drop_rate": 0.1}
    diff = (our_logits(build_gpt(loaded, inferred), token_ids) - hf_logits(hf_model, token_ids)).abs().max()
    assert diff < TOL


def test_bare_state_dict_of_unknown_width_needs_n_heads(hf_reference, tmp_path):
    _, root = hf_reference
    state_dict, _ = load_hf(root / "hf")
    torch.save(state_dict, tmp_path / "bare.pth")
    with pytest.raises(WeightFormatError, match=r"bare.pth: .*n_heads / --n-heads"):
        load_pth(tmp_path / "bare.pth")


#####################################
# Export of a gpt_train.py model
#####################################

@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A real gpt_train.py run (tiny model, 3 steps): untied head, no qkv biases, context 32."""
    import gpt_train

    out = tmp_path_factory.mktemp("train")
    assert gpt_train.cli(["--model", "tiny", "--max-steps", "3", "--output-dir", str(out), "--no-progress",
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
    assert set(state_dict) == set(checkpoint["model"])
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(state_dict[name], tensor), name


def test_conversions_are_inverse_for_a_head_equal_to_the_embedding():
    """What the book's load_weights_into_gpt gives: the head is its own copy of the embedding."""
    cfg = {"vocab_size": 100, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 3,
           "drop_rate": 0.0, "qkv_bias": True}
    torch.manual_seed(0)
    model = GPTModel(cfg)
    model.out_head.weight = torch.nn.Parameter(model.tok_emb.weight.detach().clone())
    hf = gpt_to_hf_state_dict(model.state_dict(), cfg)
    assert "lm_head.weight" not in hf  # equal: tied in the export, config.json says so
    back = hf_to_gpt_state_dict(hf, cfg["n_layers"])
    assert list(back) == list(model.state_dict())  # the book's keys, masks included, in the model's order
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
    (["no/such/file.pth", "out.pth"], "No .pth file at no/such/file.pth"),
    (["./missing-folder", "out.pth"], "does not exist"),
    (["x.pth", "out"], "must be a .pth file"),
    (["x.pth", "out.pth", "--to", "safetensors"], "must be a .safetensors file"),
    (["x.pth", "out.json", "--to", "hf"], "output is a folder"),
    (["x.pth", "out.pth", "--n-heads", "0"], "--n-heads must be a positive number"),
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


#####################################
# Formats: .safetensors in and out, the tied or untied head
#####################################

def test_safetensors_output_round_trip_with_config_in_metadata(hf_reference, token_ids, tmp_path):
    hf_model, root = hf_reference
    assert main([str(root / "hf"), str(tmp_path / "gpt2.safetensors"), "--to", "safetensors"]) == 0
    state_dict, cfg = load_any(str(tmp_path / "gpt2.safetensors"))
    assert cfg["n_heads"] == 4  # from the metadata: the width 48 alone would not tell
    assert (our_logits(build_gpt(state_dict, cfg), token_ids) - hf_logits(hf_model, token_ids)).abs().max() < TOL


def test_hub_style_safetensors_file_without_config(hf_reference, token_ids, tmp_path):
    """A model.safetensors downloaded on its own (Hugging Face names, no config.json)."""
    hf_model, root = hf_reference
    (tmp_path / "model-gpt2.safetensors").write_bytes((root / "hf" / "model.safetensors").read_bytes())
    state_dict, cfg = load_any(str(tmp_path / "model-gpt2.safetensors"), n_heads=4)
    assert (our_logits(build_gpt(state_dict, cfg), token_ids) - hf_logits(hf_model, token_ids)).abs().max() < TOL


@pytest.mark.parametrize("head", ["equal to the embedding", "trained on its own"])
def test_export_ties_the_head_only_when_equal_and_says_so(head, hf_reference, token_ids, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    hf_model, root = hf_reference
    state_dict, cfg = load_hf(root / "hf")
    if head == "trained on its own":
        state_dict["out_head.weight"] = state_dict["out_head.weight"] + 0.01
    torch.save({"model": state_dict, "config": cfg}, tmp_path / "in.pth")
    assert main([str(tmp_path / "in.pth"), str(tmp_path / "out"), "--to", "hf"]) == 0
    out = capsys.readouterr().out
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tied = head == "equal to the embedding"
    assert exported.config.tie_word_embeddings == tied
    assert ("ties them" in out) == tied and ("tie_word_embeddings: false" in out) == (not tied)
    ours = our_logits(build_gpt(state_dict, cfg), token_ids)
    assert (ours - hf_logits(exported, token_ids)).abs().max() < TOL


#####################################
# Faults: one line naming the file, nothing half-written
#####################################

def _truncate(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def _pth(tmp_path, root, damage):
    state_dict, cfg = load_hf(root / "hf")
    damage(state_dict)
    torch.save({"model": state_dict, "config": cfg}, tmp_path / "in.pth")


def _hf_folder(tmp_path, root, damage):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((root / "hf" / name).read_bytes())
    damage(folder)


def _non_causal_mask(sd):
    sd["trf_blocks.1.att.mask"] = torch.zeros(64, 64)


INPUT_FAULTS = {
    "truncated pth": ("in.pth", lambda t, r: _truncate(r / "legacy.pth", t / "in.pth"),
                      "in.pth is not a readable PyTorch checkpoint"),
    "garbage pth": ("in.pth", lambda t, r: (t / "in.pth").write_bytes(b"PK\x03\x04 not really" * 50),
                    "in.pth is not a readable PyTorch checkpoint"),
    "foreign pth": ("in.pth", lambda t, r: torch.save({"optimizer_state_dict": {"lr": 0.1}}, t / "in.pth"),
                    "in.pth holds no model state dict"),
    "missing tensor": ("in.pth", lambda t, r: _pth(t, r, lambda sd: sd.pop("trf_blocks.0.norm2.shift")),
                       "Missing tensor 'trf_blocks.0.norm2.shift'"),
    "mis-shaped tensor": ("in.pth", lambda t, r: _pth(t, r, lambda sd: sd.update(
        {"trf_blocks.1.ff.layers.0.bias": torch.zeros(7)})), "'trf_blocks.1.ff.layers.0.bias' has shape (7,)"),
    "non-causal mask": ("in.pth", lambda t, r: _pth(t, r, _non_causal_mask), "is not a causal mask"),
    "truncated safetensors": ("in.safetensors", lambda t, r: _truncate(r / "hf" / "model.safetensors",
                                                                      t / "in.safetensors"),
                              "in.safetensors is not a complete safetensors file"),
    "foreign safetensors": ("in.safetensors", lambda t, r: save_file({"model.embed_tokens.weight": torch.zeros(4, 2)},
                                                                     t / "in.safetensors"),
                            "holds neither GPTModel's tensors"),
    "truncated config.json": ("in", lambda t, r: _hf_folder(t, r, lambda f: _truncate(f / "config.json",
                                                                                      f / "config.json")),
                              "config.json is not valid JSON"),
    "truncated model.safetensors": ("in", lambda t, r: _hf_folder(t, r, lambda f: _truncate(
        f / "model.safetensors", f / "model.safetensors")), "model.safetensors is not a complete safetensors file"),
    "foreign config.json": ("in", lambda t, r: _hf_folder(t, r, lambda f: (f / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 32000}))), "config.json: config.json describes a 'llama'"),
}


@pytest.fixture(scope="module")
def legacy_pth(hf_reference):
    """A complete .pth of the tiny model (bare state dict), to damage."""
    _, root = hf_reference
    state_dict, _ = load_hf(root / "hf")
    torch.save(state_dict, root / "legacy.pth")
    return root / "legacy.pth"


@pytest.mark.parametrize("fault", sorted(INPUT_FAULTS))
def test_damaged_or_foreign_input_is_one_line(fault, hf_reference, legacy_pth, tmp_path, capsys):
    _, root = hf_reference
    name, write, message = INPUT_FAULTS[fault]
    write(tmp_path, root)
    assert main([str(tmp_path / name), str(tmp_path / "out.pth"), "--n-heads", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []  # nothing written


def test_unreachable_hub_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    assert main(["openai-community/gpt2", str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not get config.json of openai-community/gpt2") and err.count("\n") == 1


def test_existing_output_needs_overwrite(hf_reference, tmp_path, capsys):
    _, root = hf_reference
    (tmp_path / "out.pth").write_bytes(b"someone's file")
    assert main([str(root / "hf"), str(tmp_path / "out.pth")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out.pth").read_bytes() == b"someone's file"
    assert main([str(root / "hf"), str(tmp_path / "out.pth"), "--overwrite"]) == 0
    assert "model" in torch.load(tmp_path / "out.pth", weights_only=True)


def test_output_folder_that_does_not_exist_is_refused_before_reading(tmp_path, capsys):
    assert main(["never-read.pth", str(tmp_path / "missing" / "out.pth")]) == 2
    assert "does not exist or is not writable" in capsys.readouterr().err


def test_second_conversion_to_the_same_output_is_refused(hf_reference, tmp_path, capsys):
    from ch05_utils import RunLock

    _, root = hf_reference
    with RunLock(tmp_path, ".out.pth.convert.lock"):
        assert main([str(root / "hf"), str(tmp_path / "out.pth")]) == 2
    assert "is in use by a running job" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_interrupted_export_leaves_no_folder_and_no_temporary_files(hf_reference, tmp_path, capsys, monkeypatch):
    """Ctrl-C (or SIGTERM) while the second file of a Hugging Face export is written."""
    import convert_gpt2_weights

    _, root = hf_reference
    real_publish = convert_gpt2_weights.publish_atomic

    def publish_then_interrupt(path, write):
        if path.name == "config.json":
            raise KeyboardInterrupt
        return real_publish(path, write)

    monkeypatch.setattr(convert_gpt2_weights, "publish_atomic", publish_then_interrupt)
    assert main([str(root / "hf"), str(tmp_path / "export"), "--to", "hf"]) == 130
    assert "Interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no export folder, no temporary folder, no lock file


def test_sigterm_is_handled_like_ctrl_c(hf_reference, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import convert_gpt2_weights

    _, root = hf_reference
    monkeypatch.setattr(convert_gpt2_weights, "build_gpt",
                        lambda *a: os.kill(os.getpid(), signal.SIGTERM))  # arrives while converting
    assert main([str(root / "hf"), str(tmp_path / "out.pth")]) == 130
    assert not (tmp_path / "out.pth").exists()
