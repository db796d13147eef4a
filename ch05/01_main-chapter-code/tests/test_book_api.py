"""The book's calls work on our files, with the book's argument order and behaviour.

Readers paste the book's code, load the `model.pth` files they saved with the book's
model, and carry `previous_chapters.py` and `gpt_download.py` on into chapters 6 and 7.
Each test makes such a call and checks the result against what the book's code does,
using a reference model written the book's way (`BookGPTModel`, tests/book_reference.py).
"""

import inspect
import os
from pathlib import Path

import gpt_download
import gpt_generate
import gpt_train
import previous_chapters
import pytest
import torch
import torch.nn as nn
from book_reference import BookGPTModel, book_generate, book_load_weights_into_gpt
from ch05_utils import check_weights_loaded, load_gpt_model, read_text_file, the_verdict_path
from gpt_download import config_from_hparams, download_and_load_gpt2, download_file
from previous_chapters import GPT_CONFIG_124M, GPTModel, generate, get_tokenizer, load_weights_into_gpt

# The book's test configuration for gpt_train.main (one epoch: 39 evaluations).
BOOK_TEST_CONFIG = {"vocab_size": 50257, "context_length": 12, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                    "drop_rate": 0.1, "qkv_bias": False}
BOOK_TEST_SETTINGS = {"learning_rate": 5e-4, "num_epochs": 1, "batch_size": 2, "weight_decay": 0.1}
TINY = {**GPT_CONFIG_124M, "vocab_size": 500, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "qkv_bias": True}


def random_params(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter random values, so any misplaced tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture
def token_batch():
    return torch.randint(0, TINY["vocab_size"], (2, TINY["context_length"]), generator=torch.Generator().manual_seed(1))


#####################################
# Names and signatures
#####################################

# What the book's files define, with their positional parameters (name or name=default).
BOOK_SIGNATURES = {
    "create_dataloader_v1": ["txt", "batch_size=4", "max_length=256", "stride=128", "shuffle=True",
                             "drop_last=True", "num_workers=0"],
    "generate_text_simple": ["model", "idx", "max_new_tokens", "context_size"],
    "text_to_token_ids": ["text", "tokenizer"],
    "token_ids_to_text": ["token_ids", "tokenizer"],
    "calc_loss_batch": ["input_batch", "target_batch", "model", "device"],
    "calc_loss_loader": ["data_loader", "model", "device", "num_batches=None"],
    "evaluate_model": ["model", "train_loader", "val_loader", "device", "eval_iter"],
    "generate_and_print_sample": ["model", "tokenizer", "device", "start_context"],
    "train_model_simple": ["model", "train_loader", "val_loader", "optimizer", "device", "num_epochs",
                           "eval_freq", "eval_iter", "start_context", "tokenizer"],
    "plot_losses": ["epochs_seen", "tokens_seen", "train_losses", "val_losses"],
    "generate": ["model", "idx", "max_new_tokens", "context_size", "temperature=0.0", "top_k=None", "eos_id=None"],
    "assign": ["left", "right"],
    "load_weights_into_gpt": ["gpt", "params"],
    "download_and_load_gpt2": ["model_size", "models_dir"],
    "download_file": ["url", "destination", "backup_url=None"],
    "load_gpt2_params_from_tf_ckpt": ["ckpt_path", "settings"],
}
# Which of those each of our files must provide, as the book's files (and chapters 6
# and 7's previous_chapters.py) do.
BOOK_NAMES = {
    previous_chapters: ["GPTDatasetV1", "MultiHeadAttention", "LayerNorm", "GELU", "FeedForward",
                        "TransformerBlock", "GPTModel", "create_dataloader_v1", "generate_text_simple", "generate",
                        "train_model_simple", "evaluate_model", "generate_and_print_sample", "assign",
                        "load_weights_into_gpt", "text_to_token_ids", "token_ids_to_text", "calc_loss_batch",
                        "calc_loss_loader", "plot_losses"],
    gpt_train: ["main", "text_to_token_ids", "token_ids_to_text", "calc_loss_batch", "calc_loss_loader",
                "evaluate_model", "generate_and_print_sample", "train_model_simple", "plot_losses", "GPTModel",
                "create_dataloader_v1", "generate_text_simple"],
    gpt_generate: ["main", "text_to_token_ids", "token_ids_to_text", "download_and_load_gpt2", "download_file",
                   "load_gpt2_params_from_tf_ckpt", "assign", "load_weights_into_gpt", "generate", "GPTModel"],
    gpt_download: ["download_and_load_gpt2", "download_file", "load_gpt2_params_from_tf_ckpt"],
}


def positional_signature(func) -> list[str]:
    params = [p for p in inspect.signature(func).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params]


@pytest.mark.parametrize("module", list(BOOK_NAMES), ids=lambda m: m.__name__)
def test_our_files_define_the_books_names_with_the_books_signatures(module):
    for name in BOOK_NAMES[module]:
        assert hasattr(module, name), f"{module.__name__} lacks the book's {name}"
        if name in BOOK_SIGNATURES:
            func = getattr(module, name)
            assert positional_signature(func) == BOOK_SIGNATURES[name], f"{module.__name__}.{name}"
            extras = [p for p in inspect.signature(func).parameters.values() if p.kind == p.KEYWORD_ONLY]
            assert all(p.default is not p.empty for p in extras), f"{name}: our extras need defaults"


#####################################
# gpt_train.main, the book's way
#####################################

def test_gpt_train_main_gives_the_books_39_losses():
    train_losses, val_losses, tokens_seen, model = gpt_train.main(BOOK_TEST_CONFIG, BOOK_TEST_SETTINGS)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 39
    assert isinstance(model, GPTModel)
    assert tokens_seen == sorted(tokens_seen) and tokens_seen[0] == 2 * 12  # one batch of 2 x 12 tokens
    assert train_losses[-1] < train_losses[0]


def test_gpt_train_main_reads_the_verdict_from_the_working_directory(tmp_path, monkeypatch):
    text = read_text_file(the_verdict_path())
    (tmp_path / "the-verdict.txt").write_text(text[: len(text) // 2], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    settings = {**BOOK_TEST_SETTINGS, "batch_size": 4}
    train_losses, _, _, _ = gpt_train.main(BOOK_TEST_CONFIG, settings)
    tokens = len(get_tokenizer().encode(text[: int(0.9 * (len(text) // 2))]))
    steps = len(range(0, tokens - 12, 12)) // 4  # the book's windows, drop_last batches of 4
    assert len(train_losses) == len(range(0, steps, 5))


#####################################
# State dicts and files, both ways
#####################################

def test_state_dicts_interchange_with_the_books_model(token_batch):
    torch.manual_seed(0)
    ours, book = GPTModel(TINY).eval(), BookGPTModel(TINY).eval()
    random_params(ours)
    book.load_state_dict(ours.state_dict())  # strict: every key, the causal masks included
    assert torch.equal(book(token_batch), ours(token_batch))
    random_params(book, seed=1)
    ours.load_state_dict(book.state_dict())
    assert torch.equal(ours(token_batch), book(token_batch))


def test_the_books_model_pth_and_model_and_optimizer_pth_load(tmp_path, token_batch):
    book = BookGPTModel(TINY).eval()
    random_params(book)
    torch.save(book.state_dict(), tmp_path / "model.pth")  # the book's section 5.4
    optimizer = torch.optim.AdamW(book.parameters(), lr=0.0004, weight_decay=0.1)
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    for name in ("model.pth", "model_and_optimizer.pth"):
        ours, config = load_gpt_model(tmp_path / name, n_heads=TINY["n_heads"])
        assert config == TINY
        assert torch.equal(ours(token_batch), book(token_batch))
    plain = GPTModel(TINY)  # and the book's own loading code, on our model
    plain.load_state_dict(torch.load(tmp_path / "model.pth", map_location="cpu", weights_only=True))


def test_the_books_model_pth_of_the_chapter_needs_no_config(tmp_path):
    cfg = {**GPT_CONFIG_124M, "vocab_size": 300, "n_layers": 1}  # the chapter's shape, smaller
    torch.save(BookGPTModel(cfg).state_dict(), tmp_path / "model.pth")
    _, config = load_gpt_model(tmp_path / "model.pth")
    assert config == cfg  # n_heads follows from GPT-2's width, qkv_bias from the keys


def test_the_memory_efficient_recipes_of_the_course_give_the_right_logits(tmp_path, token_batch):
    reference = GPTModel(TINY).eval()
    random_params(reference)
    torch.save(reference.state_dict(), tmp_path / "model.pth")
    expected = reference(token_batch)

    with torch.device("meta"):
        model = GPTModel(TINY)
    model.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True, mmap=True), assign=True)
    check_weights_loaded(model)
    assert torch.equal(model.eval()(token_batch), expected)

    with torch.device("meta"):
        model = GPTModel(TINY)
    model = model.to_empty(device="cpu")
    state_dict = torch.load(tmp_path / "model.pth", map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():  # every tensor: parameters and the masks
            tensor.copy_(state_dict[name])
    assert torch.equal(model.eval()(token_batch), expected)


def test_a_model_with_meta_tensors_is_refused(tmp_path):
    with torch.device("meta"):
        model = GPTModel(TINY)
    with pytest.raises(ValueError, match="never loaded .*meta device"):
        check_weights_loaded(model)
    partial = {k: v for k, v in GPTModel(TINY).state_dict().items() if "trf_blocks.1.ff" not in k}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth does not fit this model: 4 missing"):
        load_gpt_model(tmp_path / "partial.pth", n_heads=4)


#####################################
# OpenAI's weights
#####################################

@pytest.fixture(scope="module")
def openai_params(gpt2_test_server, tmp_path_factory):
    return download_and_load_gpt2("124M", tmp_path_factory.mktemp("gpt2"), base_url=gpt2_test_server.base_url,
                                  progress=False)


def test_load_weights_into_gpt_gives_the_books_model(openai_params):
    settings, params = openai_params
    cfg = config_from_hparams(settings)
    ours, book = GPTModel(cfg).eval(), BookGPTModel(cfg).eval()
    load_weights_into_gpt(ours, params)
    book_load_weights_into_gpt(book, params)
    assert ours.out_head.weight is not ours.tok_emb.weight  # its own copy, as in the book
    assert torch.equal(ours.out_head.weight, ours.tok_emb.weight)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in book.parameters())
    ours_sd, book_sd = ours.state_dict(), book.state_dict()
    assert ours_sd.keys() == book_sd.keys()
    assert all(torch.equal(ours_sd[k], book_sd[k]) for k in ours_sd)


def test_generate_stops_at_eos_and_samples_like_the_book(openai_params):
    settings, params = openai_params
    model = GPTModel(config_from_hparams(settings)).eval()
    load_weights_into_gpt(model, params)
    idx = torch.tensor([get_tokenizer().encode("Every effort moves you")])
    greedy = book_generate(model, idx, 10, 64)
    for eos_id in (greedy[0, 4].item(), greedy[0, 8].item(), None):
        assert torch.equal(generate(model, idx, 10, 64, eos_id=eos_id), book_generate(model, idx, 10, 64,
                                                                                       eos_id=eos_id))
    for kwargs in ({"temperature": 1.4, "top_k": 25}, {"temperature": 0.7}, {"top_k": 3}):
        torch.manual_seed(123)
        expected = book_generate(model, idx, 12, 64, **kwargs)
        torch.manual_seed(123)
        assert torch.equal(generate(model, idx, 12, 64, **kwargs), expected), kwargs


def test_gpt_generate_main_runs_the_books_call(gpt2_test_server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the book's main downloads into ./gpt2
    monkeypatch.setenv("GPT2_BASE_URL", gpt2_test_server.base_url)
    cfg = config_from_hparams(gpt2_test_server.hparams)
    gpt_generate.main(cfg, "Every effort moves you", "124M", torch.device("cpu"))
    printed = capsys.readouterr().out
    assert printed.startswith("Output text:\n")
    settings, params = download_and_load_gpt2("124M", "gpt2", progress=False)
    model = BookGPTModel(cfg).eval()
    book_load_weights_into_gpt(model, params)
    torch.manual_seed(123)
    out = book_generate(model, torch.tensor([get_tokenizer().encode("Every effort moves you")]), 25, 64,
                        temperature=1.0, top_k=50)
    assert printed == "Output text:\n " + get_tokenizer().decode(out[0].tolist()) + "\n"
    assert (Path("gpt2") / "124M" / "hparams.json").is_file()


def test_download_file_takes_the_books_backup_url(gpt2_test_server, tmp_path):
    dead = "http://127.0.0.1:9/124M/hparams.json"  # the discard port: nothing listens
    backup = f"{gpt2_test_server.base_url}/124M/hparams.json"
    path = download_file(dead, tmp_path / "hparams.json", backup, retries=1, progress=False)
    assert path.read_bytes() == (gpt2_test_server.folder / "hparams.json").read_bytes()
    os.remove(path)
    download_file(backup, str(tmp_path / "hparams.json"))  # the book's two-argument call
    assert (tmp_path / "hparams.json").is_file()
