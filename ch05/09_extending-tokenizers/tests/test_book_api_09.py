"""The course's extend-tiktoken notebook, run against this folder.

The course's notebook defines its names in cells (`base_tokenizer`, `custom_tokens`,
`custom_token_ids`, `extended_tokenizer`, `special_tokens_set`, ...), downloads GPT-2
with `download_and_load_gpt2(model_size=..., models_dir=...)`, builds `GPTModel` and
grows the embedding and the output head by hand. These tests check that our notebook
defines the same names with the course's values, that the course's calls work with
this folder's modules, and how `resize_token_embeddings` differs from the hand-made
recipe (no random bias, so no old logit moves).
"""

import copy
from pathlib import Path

import nbformat
import pytest
import torch
from gpt_download import config_from_hparams, download_and_load_gpt2, load_weights_into_gpt
from previous_chapters import GPTModel
from tokenizer_extension import build_encoding, extended_encoding_definition, is_head_tied, resize_token_embeddings

NOTEBOOK = Path(__file__).resolve().parent.parent / "extend-tiktoken.ipynb"
COURSE_SAMPLE = "Sample text with MyNewToken_1 and MyNewToken_2. <|endoftext|>"
# What the course's notebook prints for these encodings (tiktoken's GPT-2 ranks).
COURSE_BASE_IDS = [15496, 11, 2011, 3791, 30642, 62, 16, 318, 257, 649, 11241, 13, 220, 50256]
COURSE_EXTENDED_IDS = [36674, 2420, 351, 220, 50257, 290, 220, 50258, 13, 220, 50256]


@pytest.fixture(scope="module")
def section_1():
    """Run the notebook's code cells up to the first one that needs OpenAI's weights."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "needs-openai-weights" in cell.metadata.get("tags", []):
            break
        exec(compile(cell.source, str(NOTEBOOK), "exec"), namespace)
    import matplotlib.pyplot as plt
    plt.close("all")
    return namespace


def test_the_notebook_defines_the_course_names_with_the_course_values(section_1):
    ns = section_1
    assert ns["sample_text"] == "Hello, MyNewToken_1 is a new token. <|endoftext|>"
    assert ns["base_tokenizer"].encode(ns["sample_text"], allowed_special={"<|endoftext|>"}) == COURSE_BASE_IDS
    assert ns["custom_tokens"] == ["MyNewToken_1", "MyNewToken_2"]
    assert ns["custom_token_ids"] == {"MyNewToken_1": 50257, "MyNewToken_2": 50258}
    assert ns["special_tokens_set"] == {"MyNewToken_1", "MyNewToken_2", "<|endoftext|>"}
    assert ns["token_ids"] == COURSE_EXTENDED_IDS
    assert ns["extended_tokenizer"].encode(COURSE_SAMPLE, allowed_special=ns["special_tokens_set"]) \
        == COURSE_EXTENDED_IDS


def test_build_encoding_gives_the_course_tokenizer(section_1):
    ours = build_encoding(extended_encoding_definition(special_tokens=section_1["custom_tokens"]))
    course = section_1["extended_tokenizer"]
    assert ours.n_vocab == course.n_vocab == 50259
    for text in (COURSE_SAMPLE, "Hello, MyNewToken_2 is new. <|endoftext|>", "plain text only"):
        assert ours.encode(text, allowed_special="all") == course.encode(text, allowed_special="all")


@pytest.fixture(scope="module")
def course_gpt(gpt2_test_server, tmp_path_factory):
    """The course's section 2.1 with this folder's code: download (keyword call) and GPTModel.

    The course builds a randomly initialized 124M model there; we load the (tiny,
    random) served GPT-2's weights with the book's loader into a model of its shape.
    """
    settings, params = download_and_load_gpt2(model_size="124M", models_dir=tmp_path_factory.mktemp("gpt2"),
                                              base_url=gpt2_test_server.base_url, progress=False)
    gpt = GPTModel(config_from_hparams(settings))
    load_weights_into_gpt(gpt, params)
    return gpt.eval()


def test_the_course_recipe_for_embedding_and_head_works_on_our_model(course_gpt, section_1):
    """Sections 2.3 and 2.4 of the course, step by step on our GPTModel."""
    gpt = _copy(course_gpt)
    original_token_ids = section_1["base_tokenizer"].encode(COURSE_SAMPLE, allowed_special={"<|endoftext|>"})
    special_tokens_set = section_1["special_tokens_set"]
    new_token_ids = section_1["extended_tokenizer"].encode(COURSE_SAMPLE, allowed_special=special_tokens_set)
    with torch.no_grad():
        out = gpt(torch.tensor([original_token_ids]))
        with pytest.raises(IndexError):
            gpt(torch.tensor([new_token_ids]))

    num_tokens, emb_size = gpt.tok_emb.weight.shape
    new_embedding = torch.nn.Embedding(num_tokens + 2, emb_size)
    new_embedding.weight.data[:num_tokens] = gpt.tok_emb.weight.data
    gpt.tok_emb = new_embedding
    original_out_features, original_in_features = gpt.out_head.weight.shape
    new_linear = torch.nn.Linear(original_in_features, original_out_features + 2)
    with torch.no_grad():
        new_linear.weight[:original_out_features] = gpt.out_head.weight
    gpt.out_head = new_linear

    with torch.no_grad():
        output = gpt(torch.tensor([original_token_ids]))
        assert gpt(torch.tensor([new_token_ids])).shape == (1, len(new_token_ids), 50259)
    # The course's new head has a random bias: every old logit moves by exactly that bias.
    torch.testing.assert_close(output[..., :num_tokens] - out, new_linear.bias[:num_tokens].expand_as(out),
                               rtol=0, atol=1e-5)
    # The course's weight-tying note: the head can take the embedding's weight.
    gpt.out_head.weight = gpt.tok_emb.weight
    with torch.no_grad():
        assert gpt(torch.tensor([new_token_ids])).shape == (1, len(new_token_ids), 50259)


@pytest.mark.parametrize("tied", [False, True], ids=["book-loader-untied", "tied"])
def test_resize_keeps_every_old_logit_of_a_loaded_gpt2(course_gpt, section_1, tied):
    """The book's loader gives an untied head; GPT-2's checkpoint itself ties them. Both work."""
    gpt = _copy(course_gpt)
    if tied:
        gpt.out_head.weight = gpt.tok_emb.weight  # the same values as the book's copy
    else:  # as the book's load_weights_into_gpt leaves it: a copy of the embedding of its own
        gpt.out_head.weight = torch.nn.Parameter(gpt.tok_emb.weight.detach().clone())
    ids = torch.tensor([section_1["base_tokenizer"].encode(COURSE_SAMPLE, allowed_special="all")])
    with torch.no_grad():
        before = gpt(ids)
    resize_token_embeddings(gpt, section_1["extended_tokenizer"].n_vocab)
    assert is_head_tied(gpt) == tied and gpt.out_head.bias is None
    new_ids = section_1["extended_tokenizer"].encode(COURSE_SAMPLE, allowed_special="all")
    with torch.no_grad():
        after = gpt(ids)
        assert gpt(torch.tensor([new_ids])).shape[-1] == 50259
    torch.testing.assert_close(after[..., :50257], before, rtol=0, atol=1e-6)


def _copy(model: GPTModel) -> GPTModel:
    return copy.deepcopy(model)
