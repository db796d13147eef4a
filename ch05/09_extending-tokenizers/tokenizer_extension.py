"""Extend GPT-2's tiktoken encoding with new tokens and resize a GPTModel to match.

Special tokens (chat markers such as "<|user|>") are matched as whole strings before
byte-pair encoding runs, so each one becomes exactly one new id. Ordinary tokens go
through BPE like any other text, which only produces a token when a chain of merges
leads to it; `build_encoding` adds such chains for `ordinary_tokens`. Every existing id
is kept.
"""

import os
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn

BASE_ENCODING = "gpt2"


def extended_encoding_definition(special_tokens: list[str] = (), ordinary_tokens: list[str] = ()) -> dict:
    """A small JSON-able description of an extension of GPT-2's encoding.

    Saved next to a checkpoint, it rebuilds exactly the same tokenizer (`build_encoding`),
    since GPT-2's own ranks come from tiktoken and the new ids follow deterministically.
    """
    return {"base": BASE_ENCODING, "special_tokens": list(special_tokens), "ordinary_tokens": list(ordinary_tokens)}


def build_encoding(definition: dict) -> tiktoken.Encoding:
    """Rebuild the tokenizer a definition describes: ordinary tokens first, then special ones."""
    base = tiktoken.get_encoding(definition["base"])
    ranks = dict(base._mergeable_ranks)
    special = dict(base._special_tokens)
    next_id = max([*ranks.values(), *special.values()]) + 1
    for token in set(definition["special_tokens"]) & set(definition["ordinary_tokens"]):
        raise ValueError(f"{token!r} is listed both as an ordinary and as a special token; pick one.")

    for token in definition["ordinary_tokens"]:
        next_id = _add_merge_chain(token, ranks, special, base, next_id)

    seen = set()
    for token in definition["special_tokens"]:
        if not token:
            raise ValueError("A special token cannot be the empty string.")
        if token in seen:
            raise ValueError(f"Special token {token!r} is listed twice; list each new token once.")
        if token in special:
            raise ValueError(f"{token!r} is already a special token of {definition['base']} "
                             f"(id {special[token]}); choose another name.")
        _check_not_ordinary_text(token, ranks)
        seen.add(token)
        special[token] = next_id
        next_id += 1

    return tiktoken.Encoding(name=f"{definition['base']}-extended", pat_str=base._pat_str,
                             mergeable_ranks=ranks, special_tokens=special)


def _check_not_ordinary_text(token: str, ranks: dict) -> None:
    """Refuse a special token that ordinary text contains, such as "hello".

    tiktoken looks for special tokens anywhere in the text before BPE runs, even inside
    longer words. With "hello" as a special token, `encode("hello world")` is refused
    (a disallowed special token), and with `allowed_special` "Othello" comes out as
    "O", "t", <hello>. A marker needs characters that prose does not use.
    """
    if token.encode("utf-8") in ranks or token.strip().isalnum():
        marker = f"<|{token.strip()}|>"
        raise ValueError(f"{token!r} is ordinary text (a word or an existing token): tiktoken matches special "
                         f"tokens anywhere, so encode() would refuse or cut up every text containing {token!r}, "
                         f"even inside longer words. Use a marker such as {marker!r}, or add it as an "
                         "ordinary token.")


def _add_merge_chain(token: str, ranks: dict, special: dict, base: tiktoken.Encoding, next_id: int) -> int:
    """Add the merges that make BPE turn `token` into one id: (t1 t2), (t1t2 t3), ...

    BPE merges adjacent pieces whose concatenation has a rank, so a new multi-piece
    token is reachable only through such a chain. Each step of the chain becomes a
    vocabulary entry of its own; the last one is the new token.
    """
    if not token:
        raise ValueError("An ordinary token cannot be the empty string.")
    if token in special:
        raise ValueError(f"{token!r} is a special token; it cannot also be an ordinary one.")
    if len(_pretokenize(base, token)) != 1:
        raise ValueError(f"{token!r} would be split by GPT-2's pre-tokenizer (at spaces, digits or "
                         "punctuation) before BPE, so it can never be one token; use a single word "
                         "(optionally with one leading space) or make it a special token.")
    data = token.encode("utf-8")
    if data in ranks:
        raise ValueError(f"{token!r} is already a token of the vocabulary (id {ranks[data]}).")
    pieces = [base.decode_single_token_bytes(t) for t in base.encode_ordinary(token)]
    merged = pieces[0]
    for piece in pieces[1:]:
        merged += piece
        if merged not in ranks:
            ranks[merged] = next_id
            next_id += 1
    return next_id


def _pretokenize(base: tiktoken.Encoding, text: str) -> list[str]:
    import regex  # tiktoken's patterns need the `regex` module (a tiktoken dependency)

    return regex.findall(base._pat_str, text)


def resize_token_embeddings(model: nn.Module, new_vocab_size: int) -> nn.Module:
    """Grow `model.tok_emb` and `model.out_head` to `new_vocab_size` rows, in place.

    Existing rows are copied unchanged, so the logits of the original vocabulary stay
    exactly the same. New rows start at the mean of the existing rows of the same
    matrix: a new token then looks like an "average" token instead of random noise,
    which keeps the first fine-tuning steps stable. Both kinds of head work:

    * untied: the head is its own matrix, as after the book's `load_weights_into_gpt`
      (it copies GPT-2's token embedding into the head). The head grows on its own.
    * tied: the head *is* the embedding's weight (GPT-2's original checkpoints and
      many models share them to save parameters). The new head shares the new
      embedding's weight again, so the two stay one tensor.

    No bias is added to the head: the book's recipe (`nn.Linear(..., bias=True)`)
    adds a random bias that shifts every original logit.
    """
    old_emb = model.tok_emb
    old_vocab, emb_dim = old_emb.weight.shape
    if new_vocab_size < old_vocab:
        raise ValueError(f"new_vocab_size ({new_vocab_size}) is smaller than the current vocabulary "
                         f"({old_vocab}); shrinking would drop existing tokens.")
    if model.out_head.bias is not None:
        raise ValueError("The output head has a bias; this function expects GPT-2's bias-free head.")
    if tuple(model.out_head.weight.shape) != (old_vocab, emb_dim):
        raise ValueError(f"The output head has shape {tuple(model.out_head.weight.shape)}, the embedding "
                         f"{(old_vocab, emb_dim)}; resize a model whose head and embedding have the same vocabulary.")
    tied = is_head_tied(model)
    model.tok_emb = _grown(old_emb, new_vocab_size)
    if tied:
        model.out_head = nn.Linear(emb_dim, new_vocab_size, bias=False, device=old_emb.weight.device,
                                   dtype=old_emb.weight.dtype)
        model.out_head.weight = model.tok_emb.weight
    else:
        model.out_head = _grown(model.out_head, new_vocab_size)
    return model


def is_head_tied(model: nn.Module) -> bool:
    """True if the output head uses the token embedding's weight tensor itself."""
    return model.out_head.weight is model.tok_emb.weight


def _grown(layer: nn.Embedding | nn.Linear, rows: int) -> nn.Embedding | nn.Linear:
    """A copy of `layer` (an embedding or a bias-free linear layer) with `rows` rows:
    the old rows copied, the new ones set to the mean of the old ones."""
    old = layer.weight
    factory = {"device": old.device, "dtype": old.dtype}
    if isinstance(layer, nn.Embedding):
        new_layer = nn.Embedding(rows, old.shape[1], **factory)
    else:
        new_layer = nn.Linear(old.shape[1], rows, bias=False, **factory)
    with torch.no_grad():
        new_layer.weight[:old.shape[0]] = old
        new_layer.weight[old.shape[0]:] = old.mean(dim=0)
    return new_layer


def save_extended_checkpoint(path: str | Path, model: nn.Module, config: dict, definition: dict) -> None:
    """Save the resized model, its config and the tokenizer definition in one file, atomically.

    A state dict stores tensors, not the fact that two of them are one: a tied head
    would load back as a separate copy and drift apart from the embedding during
    training. So whether the head is tied is saved too. The file is written under a
    temporary name and renamed, so a crash never leaves a half-written checkpoint.
    """
    path = Path(path)
    if config["vocab_size"] != model.tok_emb.weight.shape[0]:
        raise ValueError(f"config['vocab_size'] is {config['vocab_size']}, the model has "
                         f"{model.tok_emb.weight.shape[0]} token embeddings; pass the resized model's config.")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"model": model.state_dict(), "config": config, "tokenizer": definition,
                    "tied_head": is_head_tied(model)}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_extended_checkpoint(path: str | Path, model_class: type[nn.Module]) -> tuple[nn.Module, tiktoken.Encoding]:
    """The model (`model_class(config)`, in eval mode) and the tokenizer saved by `save_extended_checkpoint`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = model_class(checkpoint["config"])
    model.load_state_dict(checkpoint["model"])
    if checkpoint["tied_head"]:
        model.out_head.weight = model.tok_emb.weight
    return model.eval(), build_encoding(checkpoint["tokenizer"])


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """The next multiple of `multiple`: matrix kernels run faster on such sizes (50257 -> 50304)."""
    if vocab_size < 1 or multiple < 1:
        raise ValueError(f"vocab_size and multiple must be positive, got {vocab_size} and {multiple}.")
    return -(-vocab_size // multiple) * multiple


class TrimPaddedLogits(nn.Module):
    """Wrap a model whose vocabulary is padded so that only real token ids get logits.

    Padding rows exist only to make the matrices a friendly size; no text maps to
    them. Cutting the logits to the real vocabulary means that sampling, argmax and
    the loss can never pick a padded id.
    """

    def __init__(self, model: nn.Module, real_vocab_size: int):
        super().__init__()
        self.model = model
        self.real_vocab_size = real_vocab_size
        self.pos_emb = model.pos_emb  # generate_and_print_sample reads the context size here

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[..., :self.real_vocab_size]
