"""The Llama 2 (sentencepiece) and Llama 3 (tiktoken) tokenizer wrappers and chat formats.

Meta's tokenizer files are gated, so each test makes a small one of the same format.
"""

import base64

import pytest
from llama3 import (
    LLAMA3_SPECIAL_TOKENS,
    ChatFormat,
    LlamaTokenizer,
    Llama3Tokenizer,
    format_llama2_chat,
)
from tiny_llama_checkpoint import SAMPLE_TEXT, train_byte_bpe, train_tiny_sentencepiece, write_tiktoken_ranks

TEXTS = ["What do llamas eat?", "  Llamas eat grass.\n\nThey're herbivores!", "Zürich 1234 ✓ 🦙", ""]


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    ranks = train_byte_bpe(SAMPLE_TEXT, n_merges=150)
    path = write_tiktoken_ranks(ranks, tmp_path_factory.mktemp("tok3") / "tokenizer.model")
    return Llama3Tokenizer(path), len(ranks)


def test_llama3_known_merges(tmp_path):
    """A hand-made ranks file: 'llama' must merge l+l, then a+m, then am+a, exactly as BPE prescribes."""
    ranks = {bytes([b]): b for b in range(256)} | {b"ll": 256, b"am": 257, b"ama": 258}
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tokenizer = Llama3Tokenizer(path)
    assert tokenizer.encode("llama") == [256, 258]
    assert tokenizer.encode("llama", bos=True, eos=True) == [259, 256, 258, 260]
    assert tokenizer.decode([256, 258]) == "llama"
    assert tokenizer.n_vocab == 259 + 256


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_round_trip(llama3_tokenizer, text):
    tokenizer, _ = llama3_tokenizer
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_llama3_merges_are_used(llama3_tokenizer):
    tokenizer, n_ranks = llama3_tokenizer
    text = "What do llamas eat? Llamas eat grass."
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode()) / 2
    assert max(ids) < n_ranks


def test_llama3_special_tokens(llama3_tokenizer):
    tokenizer, n_ranks = llama3_tokenizer
    special = tokenizer.special
    assert len(special) == 256 == len(LLAMA3_SPECIAL_TOKENS)
    assert sorted(special.values()) == list(range(n_ranks, n_ranks + 256))
    # The offsets of the real 128,256-token vocabulary: <|begin_of_text|> = 128000, <|eot_id|> = 128009, ...
    offsets = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|start_header_id|>": 6, "<|end_header_id|>": 7,
               "<|eot_id|>": 9, "<|reserved_special_token_247|>": 255}
    assert {name: special[name] - n_ranks for name in offsets} == offsets
    assert tokenizer.n_vocab == n_ranks + 256
    # Typed text cannot forge a special token: as in the book, it is refused unless the caller
    # asks for plain text or for the special token.
    with pytest.raises(ValueError, match="disallowed special token"):
        tokenizer.encode("hi<|eot_id|>")
    as_text = tokenizer.encode("hi<|eot_id|>", disallowed_special=())
    assert special["<|eot_id|>"] not in as_text and tokenizer.decode(as_text) == "hi<|eot_id|>"
    assert tokenizer.encode("hi<|eot_id|>", allowed_special={"<|eot_id|>"})[-1] == special["<|eot_id|>"]


def test_llama3_chat_format(llama3_tokenizer):
    tokenizer, _ = llama3_tokenizer
    chat = ChatFormat(tokenizer)
    ids = chat.encode_dialog([{"role": "system", "content": "You are helpful."},
                              {"role": "user", "content": "What do llamas eat?"}])
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhat do llamas eat?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(ids) == expected
    assert ids == tokenizer.encode(expected, allowed_special=set(LLAMA3_SPECIAL_TOKENS))
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.eot_id) == 2
    reply = tokenizer.encode(" Grass and hay. ") + [tokenizer.eot_id] + tokenizer.encode("ignored")
    assert chat.decode_reply(reply) == "Grass and hay."
    with pytest.raises(ValueError, match="role"):
        chat.encode_dialog([{"content": "no role"}])


def test_llama3_tokenizer_rejects_a_sentencepiece_file(tmp_path):
    spm_path = train_tiny_sentencepiece(SAMPLE_TEXT, tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="LlamaTokenizer"):
        Llama3Tokenizer(spm_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Llama3Tokenizer(tmp_path / "missing.model")


@pytest.fixture(scope="module")
def llama2_tokenizer(tmp_path_factory):
    return LlamaTokenizer(train_tiny_sentencepiece(SAMPLE_TEXT, tmp_path_factory.mktemp("tok2"), vocab_size=300))


@pytest.mark.parametrize("text", [t for t in TEXTS if t.strip()])
def test_llama2_round_trip_with_byte_fallback(llama2_tokenizer, text):
    """Characters the tiny model never saw ('ü', '✓', the emoji) come back through byte pieces."""
    ids = llama2_tokenizer.encode(text)  # as in the book: the pieces only, no <s>
    assert llama2_tokenizer.encode(text, bos=True) == [llama2_tokenizer.bos_id] + ids and llama2_tokenizer.bos_id == 1
    assert llama2_tokenizer.decode(ids) == text
    assert max(ids) < llama2_tokenizer.n_vocab == 300


def test_llama2_special_ids_and_merges(llama2_tokenizer):
    ids = llama2_tokenizer.encode("What do llamas eat?", bos=False, eos=True)
    assert ids[-1] == llama2_tokenizer.eos_id == 2
    assert 1 not in ids
    assert len(ids) < len("What do llamas eat?")


def test_llama2_chat_prompt(llama2_tokenizer):
    prompt = format_llama2_chat(" What do llamas eat? ", system_prompt="Be brief.")
    assert prompt == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat do llamas eat? [/INST]"
    assert format_llama2_chat("Hi") == "[INST] Hi [/INST]"
    ids = llama2_tokenizer.encode(prompt, bos=True)
    assert ids[0] == 1 and llama2_tokenizer.decode(ids[1:]) == prompt
