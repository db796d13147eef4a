"""Extending GPT-2's tokenizer and resizing the model keeps everything old unchanged."""

from pathlib import Path

import pytest
import tiktoken
import torch
from ch05_utils import generate
from previous_chapters import GPT_CONFIG_124M, GPTModel
from tokenizer_extension import (
    TrimPaddedLogits,
    build_encoding,
    extended_encoding_definition,
    is_head_tied,
    load_extended_checkpoint,
    padded_vocab_size,
    resize_token_embeddings,
    save_extended_checkpoint,
)

CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end_of_turn|>"]
SAMPLE = "Every effort moves you, said Jack Gisburn in 1908.\n  Naïve café <|endoftext|> done."
TINY = {**GPT_CONFIG_124M, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def base():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def extended():
    return build_encoding(extended_encoding_definition(CHAT_TOKENS, [" Gisburnian"]))


def test_existing_ids_are_unchanged(base, extended):
    for token_bytes, rank in base._mergeable_ranks.items():
        assert extended.encode_single_token(token_bytes) == rank
    assert extended.encode_single_token("<|endoftext|>") == 50256
    assert extended.decode(base.encode(SAMPLE, allowed_special="all")) == SAMPLE


def test_special_tokens_leave_the_encoding_of_old_text_unchanged(base):
    special_only = build_encoding(extended_encoding_definition(CHAT_TOKENS))
    assert special_only.encode(SAMPLE, allowed_special="all") == base.encode(SAMPLE, allowed_special="all")


def test_ordinary_tokens_can_change_how_old_text_is_split(base, extended):
    """The merge chain for " Gisburnian" passes through " Gisburn", so text that holds
    " Gisburn" now encodes differently (with new ids), unlike with special tokens."""
    assert len(base.encode(" Gisburn")) > 1
    assert len(extended.encode(" Gisburn")) == 1
    assert extended.decode(extended.encode(SAMPLE, allowed_special="all")) == SAMPLE


def test_each_new_special_token_is_one_new_id(base, extended):
    ids = [extended.encode(t, allowed_special="all") for t in CHAT_TOKENS]
    assert all(len(i) == 1 for i in ids)
    new_ids = [i[0] for i in ids]
    assert min(new_ids) >= base.n_vocab and len(set(new_ids)) == 3
    text = "<|user|>Hi<|end_of_turn|><|assistant|>Hello"
    encoded = extended.encode(text, allowed_special="all")
    assert encoded[0] == new_ids[0] and extended.decode(encoded) == text
    # Without allowing them, special tokens in user text are refused rather than silently encoded.
    with pytest.raises(ValueError):
        extended.encode(text)


def test_ordinary_token_needs_a_merge_chain(base, extended):
    assert len(base.encode(" Gisburnian")) > 1
    assert len(extended.encode(" Gisburnian")) == 1
    # It is reached through BPE inside ordinary text too...
    in_text = extended.encode("Mr Gisburnian style")
    assert extended.encode_single_token(" Gisburnian") in in_text
    assert extended.decode(in_text) == "Mr Gisburnian style"
    # ...but only in the exact form it was added (here with its leading space).
    assert len(extended.encode("Gisburnian")) > 1


def test_bad_definitions_give_clear_messages():
    with pytest.raises(ValueError, match="listed twice"):
        build_encoding(extended_encoding_definition(["<|a|>", "<|a|>"]))
    with pytest.raises(ValueError, match="already a special token"):
        build_encoding(extended_encoding_definition(["<|endoftext|>"]))
    with pytest.raises(ValueError, match="both as an ordinary and as a special"):
        build_encoding(extended_encoding_definition(["word"], ["word"]))
    with pytest.raises(ValueError, match="already a token"):
        build_encoding(extended_encoding_definition([], [" the"]))
    with pytest.raises(ValueError, match="pre-tokenizer"):
        build_encoding(extended_encoding_definition([], ["two words"]))
    with pytest.raises(ValueError, match="empty"):
        build_encoding(extended_encoding_definition([""]))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_resizing_keeps_original_logits(tied, extended):
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    if tied:
        model.out_head.weight = model.tok_emb.weight
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        before = model(idx)
    resize_token_embeddings(model, extended.n_vocab)
    with torch.no_grad():
        after = model(idx)
    assert after.shape[-1] == extended.n_vocab
    assert torch.allclose(after[..., :TINY["vocab_size"]], before, atol=1e-6, rtol=0)
    assert model.out_head.bias is None
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    mean_row = model.tok_emb.weight[:TINY["vocab_size"]].mean(dim=0)
    assert torch.allclose(model.tok_emb.weight[-1], mean_row)


@pytest.mark.parametrize("word", ["hello", " hello", "Gisburnian", "1908"])
def test_a_special_token_that_is_ordinary_text_is_refused(base, word):
    """tiktoken finds special tokens anywhere in a text, so a word as a special token
    breaks encode() of every text that contains it (and cuts up longer words)."""
    raw = tiktoken.Encoding(name="raw", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                            special_tokens={**base._special_tokens, word: base.n_vocab})
    with pytest.raises(ValueError, match="disallowed special token"):
        raw.encode(f"Othello{word} said so")
    with pytest.raises(ValueError, match="is ordinary text") as err:
        build_encoding(extended_encoding_definition([word]))
    assert f"<|{word.strip()}|>" in str(err.value)
    # Markers that prose does not contain stay accepted, e.g. the course's example.
    assert build_encoding(extended_encoding_definition(["MyNewToken_1", f"<|{word.strip()}|>"])).n_vocab == 50259


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_extended_checkpoint_keeps_tying_logits_and_tokenizer(tmp_path, extended, tied):
    definition = extended_encoding_definition(CHAT_TOKENS, [" Gisburnian"])
    torch.manual_seed(2)
    model = GPTModel(TINY).eval()
    if tied:
        model.out_head.weight = model.tok_emb.weight
    resize_token_embeddings(model, extended.n_vocab)
    config = {**TINY, "vocab_size": extended.n_vocab}
    save_extended_checkpoint(tmp_path / "extended.pth", model, config, definition)
    assert [p.name for p in tmp_path.iterdir()] == ["extended.pth"]  # no temporary file left behind

    reloaded, tokenizer = load_extended_checkpoint(tmp_path / "extended.pth", GPTModel)
    assert is_head_tied(reloaded) == tied
    ids = tokenizer.encode("<|user|>Mr Gisburnian<|end_of_turn|>", allowed_special="all")
    assert ids == extended.encode("<|user|>Mr Gisburnian<|end_of_turn|>", allowed_special="all")
    with torch.no_grad():
        assert torch.equal(reloaded(torch.tensor([ids])), model(torch.tensor([ids])))
    with pytest.raises(ValueError, match="vocab_size"):
        save_extended_checkpoint(tmp_path / "bad.pth", model, TINY, definition)


def test_saving_over_a_checkpoint_is_atomic(tmp_path, monkeypatch, extended):
    """A save that dies half-way leaves the previous file intact."""
    definition = extended_encoding_definition(CHAT_TOKENS)
    model = resize_token_embeddings(GPTModel(TINY), build_encoding(definition).n_vocab)
    config = {**TINY, "vocab_size": model.tok_emb.weight.shape[0]}
    path = tmp_path / "extended.pth"
    save_extended_checkpoint(path, model, config, definition)
    before = path.read_bytes()

    def dies_half_way(obj, f):
        Path(f).write_bytes(b"PK half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_extended_checkpoint(path, model, config, definition)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["extended.pth"]


def test_resizing_cannot_shrink():
    with pytest.raises(ValueError, match="smaller than the current vocabulary"):
        resize_token_embeddings(GPTModel(TINY), 100)


def test_resizing_refuses_a_head_with_a_bias_or_another_vocabulary():
    model = GPTModel(TINY)
    model.out_head = torch.nn.Linear(TINY["emb_dim"], TINY["vocab_size"], bias=True)
    with pytest.raises(ValueError, match="has a bias"):
        resize_token_embeddings(model, TINY["vocab_size"] + 3)
    model.out_head = torch.nn.Linear(TINY["emb_dim"], TINY["vocab_size"] + 1, bias=False)
    with pytest.raises(ValueError, match="same vocabulary"):
        resize_token_embeddings(model, TINY["vocab_size"] + 3)
    assert model.tok_emb.weight.shape[0] == TINY["vocab_size"]  # nothing changed


def test_checkpoint_with_tokenizer_definition_round_trips(tmp_path, extended):
    definition = extended_encoding_definition(CHAT_TOKENS, [" Gisburnian"])
    torch.manual_seed(1)
    model = resize_token_embeddings(GPTModel(TINY).eval(), extended.n_vocab)
    torch.save({"model": model.state_dict(), "config": {**TINY, "vocab_size": extended.n_vocab},
                "tokenizer": definition}, tmp_path / "extended.pth")

    checkpoint = torch.load(tmp_path / "extended.pth", weights_only=True)
    reloaded_tokenizer = build_encoding(checkpoint["tokenizer"])
    reloaded = GPTModel(checkpoint["config"]).eval()
    reloaded.load_state_dict(checkpoint["model"])
    text = "<|user|>Mr Gisburnian<|end_of_turn|>"
    ids = reloaded_tokenizer.encode(text, allowed_special="all")
    assert ids == extended.encode(text, allowed_special="all")
    with torch.no_grad():
        assert torch.equal(reloaded(torch.tensor([ids])), model(torch.tensor([ids])))


def test_padded_vocab_size():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(64) == 64
    with pytest.raises(ValueError):
        padded_vocab_size(0)


class FavoursPadding(torch.nn.Module):
    """A stand-in model whose padded ids always get the highest logits."""

    def __init__(self, real: int, padded: int):
        super().__init__()
        self.real, self.padded = real, padded
        self.pos_emb = torch.nn.Embedding(16, 1)

    def forward(self, idx):
        logits = torch.randn(*idx.shape, self.padded, generator=torch.Generator().manual_seed(idx.sum().item()))
        logits[..., self.real:] += 20.0
        return logits


def test_generation_never_emits_padded_ids():
    real = TINY["vocab_size"]
    model = FavoursPadding(real, padded_vocab_size(real))
    idx = torch.randint(0, real, (4, 3))
    unguarded = generate(model, idx, max_new_tokens=5, context_size=16)
    assert (unguarded[:, 3:] >= real).all()  # the danger is real without the wrapper
    guarded = TrimPaddedLogits(model, real)
    for temperature in (0.0, 2.0):
        out = generate(guarded, idx, max_new_tokens=20, context_size=16, temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
        assert out.max().item() < real
