"""gpt_download.py: downloads that survive bad networks, both checkpoint readers, and
weights that give exactly Hugging Face's logits.

The GPT-2 here is a tiny random one written in OpenAI's checkpoint layout and served
from 127.0.0.1 (the `gpt2_test_server` fixture of the root conftest.py).
"""

import errno
import hashlib
import shutil
import types
import urllib.request

import gpt_download
import numpy as np
import pytest
import torch
from ch05_utils import generate
from gpt_download import (
    FILENAMES,
    GPT2_CONFIGS,
    ChecksumError,
    checkpoint_prefix,
    config_from_hparams,
    download_and_load_gpt2,
    download_file,
    download_gpt2_files,
    load_gpt2_params_from_tf_ckpt,
    load_gpt2_params_numpy,
    load_weights_into_gpt,
    params_from_tf_variables,
)
from openai_checkpoint import GPT2TestServer
from previous_chapters import GPTModel, get_tokenizer
from tf_checkpoint_reader import crc32c, read_tf_checkpoint

PROMPTS = ["Every effort moves you", "Hello, I am a language model,", "The quick brown fox jumps over the lazy dog.",
           "  Numbers: 3.14159, 2024; symbols & émojis 🙂"]


@pytest.fixture(scope="module")
def downloaded(gpt2_test_server, tmp_path_factory):
    """The tiny GPT-2 downloaded through GPT2_BASE_URL, as a user with a mirror would."""
    models_dir = tmp_path_factory.mktemp("gpt2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2_BASE_URL", gpt2_test_server.base_url)
        settings, params = download_and_load_gpt2("124M", models_dir, progress=False)
    return models_dir, settings, params


@pytest.fixture(scope="module")
def gpt(downloaded):
    _, settings, params = downloaded
    model = GPTModel(config_from_hparams(settings))
    load_weights_into_gpt(model, params)
    return model.eval()


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(gpt_download, "RETRY_BACKOFF_S", 0.0)


#####################################
# Parity with Hugging Face
#####################################

def test_download_places_the_seven_files(downloaded, gpt2_test_server):
    models_dir, settings, _ = downloaded
    assert sorted(p.name for p in (models_dir / "124M").iterdir()) == sorted(FILENAMES)
    for name in FILENAMES:
        assert (models_dir / "124M" / name).read_bytes() == (gpt2_test_server.folder / name).read_bytes()
    assert settings == gpt2_test_server.hparams


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_hugging_face(gpt, gpt2_test_server, prompt):
    ids = torch.tensor([get_tokenizer().encode(prompt)])
    with torch.no_grad():
        ours = gpt(ids)
        reference = gpt2_test_server.hf_model(ids).logits
    assert ours.shape == reference.shape
    assert reference.abs().max() > 1.0  # the weights are large enough for a wrong copy to show
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_a_batch_of_prompts_equals_hugging_face(gpt, gpt2_test_server):
    ids = torch.randint(0, 50257, (3, gpt2_test_server.hparams["n_ctx"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gpt(ids), gpt2_test_server.hf_model(ids).logits, rtol=0, atol=1e-5)


def test_greedy_generation_equals_hugging_face_generate(gpt, gpt2_test_server):
    hf_model = gpt2_test_server.hf_model
    ids = torch.tensor([get_tokenizer().encode(PROMPTS[0])])
    new_tokens = 30
    ours = generate(gpt, ids, max_new_tokens=new_tokens, context_size=gpt2_test_server.hparams["n_ctx"])
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
    assert ours.shape == (1, ids.shape[1] + new_tokens)
    assert ours.tolist() == theirs.tolist()


def test_output_head_is_its_own_copy_of_the_token_embedding(gpt):
    """As in the book: the same values, but a separate tensor that fine-tuning can change."""
    assert gpt.out_head.weight is not gpt.tok_emb.weight
    assert torch.equal(gpt.out_head.weight, gpt.tok_emb.weight)
    fresh = GPTModel(config_from_hparams({"n_vocab": 50257, "n_ctx": 64, "n_embd": 48, "n_head": 4, "n_layer": 2}))
    assert sum(p.numel() for p in gpt.parameters()) == sum(p.numel() for p in fresh.parameters())


def test_gpt2_configs_describe_the_four_sizes():
    assert list(GPT2_CONFIGS) == ["124M", "355M", "774M", "1558M"]
    for size, cfg in GPT2_CONFIGS.items():
        assert cfg["context_length"] == 1024 and cfg["vocab_size"] == 50257
        assert cfg["qkv_bias"] and cfg["drop_rate"] == 0.0
        with torch.device("meta"):  # shapes only, no memory
            model = GPTModel(cfg)
        tied = sum(p.numel() for p in model.parameters()) - cfg["vocab_size"] * cfg["emb_dim"]  # OpenAI counts once
        if size == "124M":
            assert tied == 124_439_808  # OpenAI's count; its weights file is 4 bytes per parameter
        assert abs(tied / 1e6 - int(size[:-1])) < 0.01 * int(size[:-1])


#####################################
# The two checkpoint readers
#####################################

def test_numpy_reader_returns_exactly_what_tensorflow_reads(gpt2_test_server):
    import tensorflow as tf

    prefix = str(gpt2_test_server.checkpoint_prefix)
    ours = read_tf_checkpoint(prefix)
    theirs = {name: tf.train.load_variable(prefix, name) for name, _ in tf.train.list_variables(prefix)}
    assert sorted(ours) == sorted(theirs)
    assert "model/h1/attn/c_attn/w" in ours
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        assert ours[name].tobytes() == theirs[name].tobytes(), name


def test_both_loaders_give_identical_params(gpt2_test_server):
    settings = gpt2_test_server.hparams
    with_tf = load_gpt2_params_from_tf_ckpt(gpt2_test_server.checkpoint_prefix, settings)
    without_tf = load_gpt2_params_numpy(gpt2_test_server.checkpoint_prefix, settings)

    def flatten(tree, prefix=""):
        if isinstance(tree, np.ndarray):
            return {prefix: tree}
        items = enumerate(tree) if isinstance(tree, list) else tree.items()
        return {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}/{key}").items()}

    a, b = flatten(with_tf), flatten(without_tf)
    assert sorted(a) == sorted(b) and len(a) == 4 + 12 * settings["n_layer"]
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert a["/blocks/0/attn/c_attn/w"].shape == (48, 144)  # the leading 1 of Conv1D weights is gone


def test_tensorflow_reader_through_download_and_load(downloaded, gpt2_test_server):
    models_dir, settings, params = downloaded
    settings_tf, params_tf = download_and_load_gpt2("124M", models_dir, base_url="http://127.0.0.1:9/unused",
                                                    reader="tensorflow", progress=False)
    assert settings_tf == settings
    assert np.array_equal(params_tf["wte"], params["wte"])


def test_crc32c_matches_a_bytewise_reference():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)

    def reference(data):
        crc = 0xFFFFFFFF
        for byte in data:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 32767, 32768, 32769, 65536, 100_003):  # around the size where the lanes kick in
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == reference(data), n


#####################################
# Downloads over a bad network
#####################################

@pytest.fixture
def blob_server(tmp_path):
    """A server with one 300 kB random file, `blob`, under every model size."""
    folder = tmp_path / "served"
    folder.mkdir()
    data = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (folder / "blob").write_bytes(data)
    server = GPT2TestServer(folder)
    server.data = data
    server.url = f"{server.base_url}/124M/blob"
    server.sha256 = hashlib.sha256(data).hexdigest()
    yield server
    server.stop()


def statuses(server):
    return [status for _, _, status in server.requests]


@pytest.mark.parametrize("fault", ["drop", "truncate"])
def test_an_interrupted_download_resumes_with_a_range_request(blob_server, tmp_path, fault):
    blob_server.faults["blob"] = [fault]
    path = download_file(blob_server.url, tmp_path / "blob", backoff=0, progress=False)
    assert path.read_bytes() == blob_server.data
    assert statuses(blob_server) == [200, 206]
    assert blob_server.requests[1][1] == f"bytes={len(blob_server.data) // 2}-"
    assert not (tmp_path / "blob.part").exists()


def test_a_server_error_is_retried(blob_server, tmp_path):
    blob_server.faults["blob"] = ["500", "500"]
    path = download_file(blob_server.url, tmp_path / "blob", backoff=0, progress=False)
    assert path.read_bytes() == blob_server.data
    assert statuses(blob_server) == [500, 500, 200]


def test_persistent_server_errors_end_in_a_clear_error(blob_server, tmp_path):
    blob_server.faults["blob"] = ["500"] * 10
    with pytest.raises(ConnectionError, match="HTTP 500.*after 3 attempts"):
        download_file(blob_server.url, tmp_path / "blob", retries=3, backoff=0, progress=False)
    assert not (tmp_path / "blob").exists()


def test_corrupted_bytes_are_caught_by_sha256_and_downloaded_again(blob_server, tmp_path):
    blob_server.faults["blob"] = ["corrupt"]
    path = download_file(blob_server.url, tmp_path / "blob", sha256=blob_server.sha256, backoff=0, progress=False)
    assert path.read_bytes() == blob_server.data
    assert [r[1] for r in blob_server.requests] == [None, None]  # a fresh download, not a resume of bad bytes


def test_a_corrupt_file_is_never_accepted(blob_server, tmp_path):
    blob_server.faults["blob"] = ["corrupt"] * 10
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download_file(blob_server.url, tmp_path / "blob", sha256=blob_server.sha256, retries=2, backoff=0,
                      progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "served"]  # neither blob nor blob.part


def test_a_leftover_part_file_is_resumed(blob_server, tmp_path):
    (tmp_path / "blob.part").write_bytes(blob_server.data[:123_456])
    download_file(blob_server.url, tmp_path / "blob", sha256=blob_server.sha256, progress=False)
    assert (tmp_path / "blob").read_bytes() == blob_server.data
    assert blob_server.requests == [("blob", "bytes=123456-", 206)]


def test_a_complete_part_file_needs_no_more_bytes(blob_server, tmp_path):
    (tmp_path / "blob.part").write_bytes(blob_server.data)  # e.g. killed just before the rename
    download_file(blob_server.url, tmp_path / "blob", sha256=blob_server.sha256, progress=False)
    assert (tmp_path / "blob").read_bytes() == blob_server.data
    assert statuses(blob_server) == [416]


def test_a_missing_file_is_not_retried(blob_server, tmp_path):
    with pytest.raises(ConnectionError, match="HTTP 404"):
        download_file(f"{blob_server.base_url}/124M/nothing-here", tmp_path / "x", backoff=0, progress=False)
    assert statuses(blob_server) == [404]


def test_at_least_one_attempt_is_required(blob_server, tmp_path):
    with pytest.raises(ValueError, match="retries must be at least 1"):
        download_file(blob_server.url, tmp_path / "blob", retries=0)


def test_a_full_disk_gives_a_clear_error(blob_server, tmp_path, monkeypatch):
    monkeypatch.setattr(gpt_download.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(OSError, match="Disk full.*300,000 bytes are needed") as excinfo:
        download_file(blob_server.url, tmp_path / "blob", backoff=0, progress=False)
    assert excinfo.value.errno == errno.ENOSPC
    assert not (tmp_path / "blob.part").exists() and not (tmp_path / "blob").exists()


def test_complete_files_are_used_without_any_network(gpt2_test_server, tmp_path, monkeypatch):
    server = GPT2TestServer(gpt2_test_server.folder)
    download_gpt2_files("124M", tmp_path, base_url=server.base_url, progress=False)
    server.stop()  # the server is gone, and so is the network

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    settings, params = download_and_load_gpt2("124M", tmp_path, base_url=server.base_url, progress=False)
    assert settings == gpt2_test_server.hparams and len(params["blocks"]) == 2


def test_no_network_and_nothing_cached_is_a_clear_error(blob_server, tmp_path):
    blob_server.stop()
    with pytest.raises(ConnectionError, match="Could not get checkpoint of GPT-2 124M.*GPT2_BASE_URL"):
        download_gpt2_files("124M", tmp_path, base_url=blob_server.base_url, progress=False)
    assert not any(tmp_path.rglob("checkpoint"))


def test_the_backup_mirror_is_used_when_the_main_source_fails(gpt2_test_server, tmp_path, monkeypatch):
    dead = GPT2TestServer(tmp_path)
    dead.stop()
    monkeypatch.delenv("GPT2_BASE_URL", raising=False)
    monkeypatch.setattr(gpt_download, "BASE_URL", dead.base_url)
    monkeypatch.setattr(gpt_download, "BACKUP_BASE_URL", gpt2_test_server.base_url)
    settings, _ = download_and_load_gpt2("355M", tmp_path / "models", progress=False)  # no known digests
    assert settings == gpt2_test_server.hparams


def test_known_digests_guard_the_built_in_sources(gpt2_test_server, tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2_BASE_URL", raising=False)
    monkeypatch.setattr(gpt_download, "BASE_URL", gpt2_test_server.base_url)
    monkeypatch.setattr(gpt_download, "BACKUP_BASE_URL", gpt2_test_server.base_url)
    monkeypatch.setitem(gpt_download.KNOWN_SHA256, ("355M", "hparams.json"), "0" * 64)
    with pytest.raises(ConnectionError, match="Could not get hparams.json.*SHA-256 mismatch"):
        download_gpt2_files("355M", tmp_path, progress=False)
    assert not (tmp_path / "355M" / "hparams.json").exists()
    assert not (tmp_path / "355M" / "hparams.json.part").exists()


def test_a_local_folder_works_as_the_base(gpt2_test_server, tmp_path, monkeypatch):
    (tmp_path / "mirror").mkdir()
    shutil.copytree(gpt2_test_server.folder, tmp_path / "mirror" / "774M")
    monkeypatch.setenv("GPT2_BASE_URL", str(tmp_path / "mirror"))
    settings, params = download_and_load_gpt2("774M", tmp_path / "models", progress=False)
    assert settings == gpt2_test_server.hparams
    copied = tmp_path / "models" / "774M" / "vocab.bpe"
    assert copied.read_bytes() == (gpt2_test_server.folder / "vocab.bpe").read_bytes()


def test_a_local_folder_missing_a_file_fails_at_once(gpt2_test_server, tmp_path, monkeypatch):
    (tmp_path / "mirror" / "124M").mkdir(parents=True)
    monkeypatch.setattr(gpt_download, "RETRY_BACKOFF_S", 60.0)  # a retry would make the test hang
    monkeypatch.setenv("GPT2_BASE_URL", (tmp_path / "mirror").as_uri())  # a file:// URL works too
    with pytest.raises(ConnectionError, match="Could not get checkpoint of GPT-2 124M.*after 1 attempts"):
        download_gpt2_files("124M", tmp_path / "models", progress=False)


def test_a_leftover_part_file_is_replaced_when_copying_from_a_local_folder(gpt2_test_server, tmp_path):
    source = gpt2_test_server.folder / "vocab.bpe"
    destination = tmp_path / "vocab.bpe"
    destination.with_name("vocab.bpe.part").write_bytes(b"stale bytes of an earlier attempt")
    download_file(source.as_uri(), destination, progress=False)
    assert destination.read_bytes() == source.read_bytes()
    assert not destination.with_name("vocab.bpe.part").exists()


#####################################
# Bad input
#####################################

def test_unknown_model_size_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown GPT-2 model size '125M': choose one of 124M, 355M, 774M, 1558M"):
        download_and_load_gpt2("125M", tmp_path)


def test_a_mis_shaped_tensor_is_named_with_both_shapes(downloaded):
    _, settings, params = downloaded
    bad = {**params, "blocks": [dict(b) for b in params["blocks"]]}
    bad["blocks"][1] = {**bad["blocks"][1], "mlp": {"c_fc": {"w": np.zeros((48, 100), np.float32),
                                                             "b": np.zeros(192, np.float32)},
                                                    "c_proj": params["blocks"][1]["mlp"]["c_proj"]}}
    model = GPTModel(config_from_hparams(settings))
    with pytest.raises(ValueError, match=r"block 1 \(OpenAI's h1\): Shape mismatch. Left: \(192, 48\), "
                                         r"Right: \(100, 48\)"):
        load_weights_into_gpt(model, bad)


def test_a_model_of_another_size_is_refused(downloaded):
    _, _, params = downloaded
    model = GPTModel({**GPT2_CONFIGS["124M"], "n_layers": 2, "vocab_size": 10})
    with pytest.raises(ValueError, match=r"Left: \(1024, 768\), Right: \(64, 48\).*config_from_hparams"):
        load_weights_into_gpt(model, params)


def test_a_model_without_qkv_bias_is_refused(downloaded):
    _, settings, params = downloaded
    model = GPTModel({**config_from_hparams(settings), "qkv_bias": False})
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_weights_into_gpt(model, params)


def test_a_missing_tensor_is_named(gpt2_test_server):
    variables = read_tf_checkpoint(gpt2_test_server.checkpoint_prefix)
    del variables["model/h1/ln_2/g"]
    with pytest.raises(ValueError, match=r"missing \['model/h1/ln_2/g'\]"):
        params_from_tf_variables(variables, n_layer=2)
    with pytest.raises(ValueError, match="n_layer=1.*unexpected.*model/h1/"):
        params_from_tf_variables(read_tf_checkpoint(gpt2_test_server.checkpoint_prefix), n_layer=1)


@pytest.fixture
def checkpoint_copy(gpt2_test_server, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(gpt2_test_server.folder, folder)
    return folder


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "empty", "not a table"])
def test_a_corrupt_index_file_is_a_clear_error(checkpoint_copy, damage):
    index = checkpoint_copy / "model.ckpt.index"
    data = index.read_bytes()
    damaged = {
        "flip a byte": data[:100] + bytes([data[100] ^ 0x01]) + data[101:],
        "truncate": data[:-20],
        "empty": b"",
        "not a table": b"{" + b"x" * 200 + b"}",
    }[damage]
    index.write_bytes(damaged)
    with pytest.raises(ValueError, match="model.ckpt.index is corrupt or not a TensorFlow checkpoint index"):
        read_tf_checkpoint(checkpoint_prefix(checkpoint_copy))


def test_a_corrupt_data_file_fails_its_crc(checkpoint_copy):
    data_file = checkpoint_copy / "model.ckpt.data-00000-of-00001"
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    data_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt: the bytes of tensor 'model/wte' fail their CRC-32C check"):
        read_tf_checkpoint(checkpoint_copy / "model.ckpt")


def test_a_truncated_data_file_is_a_clear_error(checkpoint_copy):
    data_file = checkpoint_copy / "model.ckpt.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        read_tf_checkpoint(checkpoint_copy / "model.ckpt")


def test_unknown_reader_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown reader 'torch'"):
        download_and_load_gpt2("124M", tmp_path, reader="torch")


#####################################
# A mirror that cuts files short, and damage found only when reading
#####################################

def test_a_json_file_cut_short_without_a_length_is_never_kept(gpt2_test_server, tmp_path):
    """A mirror that sends no Content-Length and closes early: the JSON check catches it."""
    server = GPT2TestServer(gpt2_test_server.folder, faults={"hparams.json": ["truncate-nolength"] * 10})
    try:
        with pytest.raises(ConnectionError, match="Could not get hparams.json.*not valid JSON"):
            download_gpt2_files("124M", tmp_path, base_url=server.base_url, progress=False)
    finally:
        server.stop()
    assert not (tmp_path / "124M" / "hparams.json").exists()
    settings, _ = download_and_load_gpt2("124M", tmp_path, base_url=gpt2_test_server.base_url, progress=False)
    assert settings == gpt2_test_server.hparams  # a good mirror afterwards just works


def test_a_known_size_catches_a_file_cut_short_without_a_length(gpt2_test_server, tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2_BASE_URL", raising=False)
    server = GPT2TestServer(gpt2_test_server.folder, faults={"vocab.bpe": ["truncate-nolength"] * 10})
    monkeypatch.setattr(gpt_download, "BASE_URL", server.base_url)
    monkeypatch.setattr(gpt_download, "BACKUP_BASE_URL", server.base_url)
    monkeypatch.setattr(gpt_download, "KNOWN_SHA256", {})  # the tiny model's files are not OpenAI's...
    monkeypatch.setattr(gpt_download, "KNOWN_SIZES", {("124M", "vocab.bpe"): 456318})  # ...but vocab.bpe is
    try:
        with pytest.raises(ConnectionError, match="Could not get vocab.bpe.*ended after .* of 456,318 bytes"):
            download_gpt2_files("124M", tmp_path, progress=False)
    finally:
        server.stop()
    assert not (tmp_path / "124M" / "vocab.bpe").exists()


def test_a_damaged_file_found_when_reading_is_named_and_fetched_again(gpt2_test_server, tmp_path):
    models_dir = tmp_path / "models"
    download_gpt2_files("124M", models_dir, base_url=gpt2_test_server.base_url, progress=False)
    data_file = models_dir / "124M" / "model.ckpt.data-00000-of-00001"
    damaged = bytearray(data_file.read_bytes())
    damaged[len(damaged) // 3] ^= 0x01
    data_file.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="model.ckpt.data-00000-of-00001 is corrupt.*renamed to "
                                         "model.ckpt.data-00000-of-00001.corrupt; run again"):
        download_and_load_gpt2("124M", models_dir, base_url=gpt2_test_server.base_url, progress=False)
    assert (models_dir / "124M" / "model.ckpt.data-00000-of-00001.corrupt").read_bytes() == bytes(damaged)
    settings, params = download_and_load_gpt2("124M", models_dir, base_url=gpt2_test_server.base_url,
                                              progress=False)
    assert data_file.read_bytes() == (gpt2_test_server.folder / data_file.name).read_bytes()


def test_an_hparams_file_that_does_not_parse_is_named_and_fetched_again(gpt2_test_server, tmp_path):
    models_dir = tmp_path / "models"
    download_gpt2_files("124M", models_dir, base_url=gpt2_test_server.base_url, progress=False)
    (models_dir / "124M" / "hparams.json").write_text('{"n_vocab": 50257, "n_ctx')
    with pytest.raises(ValueError, match="hparams.json is not valid JSON.*renamed to hparams.json.corrupt"):
        download_and_load_gpt2("124M", models_dir, base_url=gpt2_test_server.base_url, progress=False)
    settings, _ = download_and_load_gpt2("124M", models_dir, base_url=gpt2_test_server.base_url, progress=False)
    assert settings == gpt2_test_server.hparams
