"""The book's Llama code, called the book's way, works with llama3.py and computes what Llama computes.

Each test makes a call as the book's notebooks for this folder make it (same names,
same positional order, the book's configs without our extra keys) and checks the
result against `transformers`' Llama built from the same tiny random weights, or
against a number the book's own published run printed (parameter counts, memory).
"""

import warnings

import pytest
import torch
from llama3 import (
    LLAMA32_CONFIG_1B,
    ChatFormat,
    GroupedQueryAttention,
    Llama3Model,
    Llama3ModelFast,
    LlamaTokenizer,
    Tokenizer,
    TransformerBlock,
    calc_model_memory_size,
    clean_text,
    compute_rope_params,
    count_unique_parameters,
    generate,
    load_weights_into_llama,
)
from safetensors.torch import load_file
from tiny_llama_checkpoint import (
    SAMPLE_TEXT,
    hf_llama_config,
    make_tiny_meta_llama2_checkpoint,
    train_byte_bpe,
    train_tiny_sentencepiece,
    write_tiktoken_ranks,
)
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

VOCAB = 300
BOOK_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim", "n_kv_groups",
             "rope_base", "rope_freq", "dtype")


def book_config(hf_model) -> dict:
    """The config the book would write for this model: its keys only (no rms_norm_eps, no tie_embeddings)."""
    c = hf_model.config
    rope = c.rope_parameters if hasattr(c, "rope_parameters") else (c.rope_scaling or {})
    rope = rope or {}
    freq = None
    if rope.get("rope_type") == "llama3":
        freq = {"factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                "high_freq_factor": rope["high_freq_factor"],
                "original_context_length": rope["original_max_position_embeddings"]}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    return {"vocab_size": c.vocab_size, "context_length": c.max_position_embeddings, "emb_dim": c.hidden_size,
            "n_heads": c.num_attention_heads, "n_layers": c.num_hidden_layers, "hidden_dim": c.intermediate_size,
            "n_kv_groups": c.num_key_value_heads, "rope_base": float(theta), "rope_freq": freq,
            "dtype": torch.float32}


@pytest.fixture(scope="module", params=["2", "3", "3.1", "3.2"])
def hf_llama(request, tmp_path_factory):
    """(version, transformers model, its safetensors state dict as saved to disk) of a tiny random Llama."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_llama_config(request.param, VOCAB)).eval()
    folder = tmp_path_factory.mktemp(f"hf{request.param}")
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, load_file(str(folder / "model.safetensors"))


def test_book_config_and_load_weights_into_llama_give_transformers_logits(hf_llama, capsys):
    """The course's own check: Llama3Model(cfg) + load_weights_into_llama(model, {n_layers, hidden_dim}, params)."""
    version, hf_model, saved = hf_llama
    cfg = book_config(hf_model)
    assert set(cfg) == set(BOOK_KEYS)
    model = Llama3Model(cfg)
    assert model.cfg["rms_norm_eps"] == 1e-5 and model.out_head.weight is not model.tok_emb.weight  # book defaults
    load_weights_into_llama(model, {"n_layers": cfg["n_layers"], "hidden_dim": cfg["hidden_dim"]}, saved)
    tied = version == "3.2"  # saved without lm_head.weight: the book ties the head to the embedding
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    assert ("Model uses weight tying." in capsys.readouterr().out) == tied
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=1e-5, atol=1e-5)
        fast = Llama3ModelFast(cfg)
        fast.load_state_dict(model.state_dict())
        torch.testing.assert_close(fast(idx), hf_model(idx).logits, rtol=1e-5, atol=1e-5)
    assert count_unique_parameters(model) == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("version", ["2", "3.2"])
def test_generate_in_the_books_argument_order_matches_transformers_greedy_search(version):
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_llama_config(version, VOCAB)).eval()
    cfg = book_config(hf_model)
    model = Llama3Model(cfg)
    load_weights_into_llama(model, cfg, hf_model.state_dict())
    idx = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf_model.generate(idx, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    for use_cache in (False, True):
        out = generate(model, idx, 8, cfg["context_length"], 0.0, None, None, use_cache=use_cache)
        assert torch.equal(out, expected)
    # top_k=1 with a temperature is greedy too (the book's own check of its sampling code).
    assert torch.equal(generate(model, idx, 8, cfg["context_length"], 1.5, 1), expected)


def test_grouped_query_attention_book_signature_and_mask(hf_llama):
    _, hf_model, saved = hf_llama
    cfg = book_config(hf_model)
    model = Llama3Model(cfg)
    load_weights_into_llama(model, cfg, saved)
    block = model.trf_blocks[0]
    att = block.att
    assert isinstance(att, GroupedQueryAttention) and isinstance(block, TransformerBlock)
    assert (att.d_out, att.num_heads, att.num_kv_groups, att.group_size) == (
        cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"], cfg["n_heads"] // cfg["n_kv_groups"])
    x = torch.randn(2, 9, cfg["emb_dim"])
    mask = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)  # as the book's Llama3Model builds it
    with torch.no_grad():
        by_book = att(x, mask, model.cos, model.sin)  # forward(x, mask, cos, sin), positional
        torch.testing.assert_close(by_book, att(x, None, model.cos, model.sin))
        torch.testing.assert_close(block(x, mask, model.cos, model.sin), block(x, None, model.cos, model.sin))
        # The mask really matters: without it the first position would see the future.
        assert not torch.allclose(att(x, torch.zeros(9, 9, dtype=torch.bool), model.cos, model.sin), by_book)
    with torch.device("meta"):  # the book's comparison at Llama 3 8B size, emb_dim 4096, 32 heads
        gqa = GroupedQueryAttention(4096, 4096, 32, 8)
        mha = GroupedQueryAttention(4096, 4096, 32, 32, None)
    assert tuple(gqa.W_key.weight.shape) == (1024, 4096)
    assert sum(p.numel() for p in mha.parameters()) == 67_108_864  # the book's printed numbers
    assert sum(p.numel() for p in gqa.parameters()) == 41_943_040


def test_compute_rope_params_book_order_and_dtype(hf_llama):
    """(head_dim, theta_base, context_length, freq_config, dtype=): the tables transformers computes."""
    _, hf_model, _ = hf_llama
    cfg = book_config(hf_model)
    head_dim = cfg["emb_dim"] // cfg["n_heads"]
    cos, sin = compute_rope_params(head_dim, cfg["rope_base"], 512, cfg["rope_freq"])
    positions = torch.arange(512)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_model.config)(torch.zeros(1), positions[None])
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-5)
    # As in the book, dtype= is the dtype the positions are counted in (the tables stay float32):
    # bfloat16 has 8 significant bits, so position 511 is counted as 512.
    cos16, sin16 = compute_rope_params(head_dim, cfg["rope_base"], 512, cfg["rope_freq"], dtype=torch.bfloat16)
    assert cos16.dtype == sin16.dtype == torch.float32
    wide, _ = compute_rope_params(head_dim, cfg["rope_base"], 513, cfg["rope_freq"])
    torch.testing.assert_close(cos16[511], wide[512], rtol=0, atol=1e-6)
    assert not torch.allclose(cos16[511], cos[511])


def test_configs_without_our_extra_keys_get_the_books_defaults():
    book_1b = {k: v for k, v in LLAMA32_CONFIG_1B.items() if k in BOOK_KEYS}
    with torch.device("meta"):
        model = Llama3Model(book_1b)
    assert model.trf_blocks[0].norm1.eps == model.final_norm.eps == 1e-5
    # The book's printed numbers for Llama 3.2 1B: counted before tying, then unique after tying.
    assert sum(p.numel() for p in model.parameters()) == 1_498_482_688
    assert f"{calc_model_memory_size(model, input_dtype=torch.float32):.2f}" == "11.23"
    assert f"{calc_model_memory_size(model, input_dtype=torch.bfloat16):.2f}" == "5.61"
    model.out_head.weight = model.tok_emb.weight
    assert count_unique_parameters(model) == 1_235_814_400
    with torch.device("meta"):
        tied = Llama3Model(LLAMA32_CONFIG_1B)  # our config says tie_embeddings: True
    assert count_unique_parameters(tied) == 1_235_814_400 == sum(p.numel() for p in tied.parameters())


def test_llama2_meta_layout_with_permute_gives_transformers_logits(tmp_path):
    """consolidated.00.pth (Meta's q/k pair layout) loads through the same load_weights_into_llama."""
    folder, hf_model = make_tiny_meta_llama2_checkpoint(tmp_path)
    weights = torch.load(folder / "consolidated.00.pth", weights_only=True)  # as the book loads it
    cfg = book_config(hf_model)
    model = Llama3Model(cfg)
    load_weights_into_llama(model, cfg, weights)
    idx = torch.randint(0, cfg["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=1e-5, atol=1e-5)
    tokenizer = LlamaTokenizer(str(folder / "tokenizer.model"))  # the book passes the file's path
    assert tokenizer.encode("What do llamas eat?") == tokenizer.tokenizer.encode("What do llamas eat?", out_type=int)


@pytest.fixture(scope="module")
def full_size_ranks_file(tmp_path_factory):
    """A tokenizer.model with 128,000 ranks like Meta's: learned merges, then filler tokens."""
    ranks = train_byte_bpe(SAMPLE_TEXT, 150)
    ranks.update({f"<filler {i}>".encode(): i for i in range(len(ranks), 128_000)})
    return write_tiktoken_ranks(ranks, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_tokenizer_and_chat_format_as_in_the_book(full_size_ranks_file):
    tokenizer = Tokenizer(str(full_size_ranks_file))
    # The ids the book hard-codes for Meta's file.
    assert {name: tokenizer.special[name] for name in ("<|begin_of_text|>", "<|end_of_text|>",
                                                       "<|start_header_id|>", "<|end_header_id|>",
                                                       "<|eot_id|>")} == {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
    text = "Llamas eat grass and hay."
    assert tokenizer.encode(text, True, True) == [128000] + tokenizer.encode(text) + [128001]
    assert tokenizer.decode(tokenizer.encode(text)) == text

    chat = ChatFormat(tokenizer)
    ids = chat.encode("Hello World!")
    # The book's printed layout: <|begin_of_text|>, system header, default system text, <|eot_id|>, user ...
    assert ids[:2] == [128000, 128006] and ids.count(128009) == 2
    assert tokenizer.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello World!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    custom = ChatFormat(tokenizer, default_system="Answer briefly.")
    assert "Answer briefly." in tokenizer.decode(custom.encode("Hi"))
    assert "Be kind." in tokenizer.decode(custom.encode("Hi", "Be kind."))
    assert chat.decode(ids) == tokenizer.decode(ids)

    reply = tokenizer.decode(ids + tokenizer.encode("Grass and hay. ") + [tokenizer.special["<|eot_id|>"]])
    assert clean_text(reply) == "Grass and hay. <|eot_id|>"
    assert clean_text("no header here") == "no header here"


def test_previous_chapters_exports_what_the_books_notebooks_import():
    import previous_chapters

    assert {"generate", "text_to_token_ids", "token_ids_to_text"} <= set(dir(previous_chapters))


def test_text_to_token_ids_with_llama_tokenizers(tmp_path, full_size_ranks_file):
    from previous_chapters import text_to_token_ids, token_ids_to_text

    tokenizer = Tokenizer(str(full_size_ranks_file))
    chat = ChatFormat(tokenizer)
    assert text_to_token_ids("Every effort", tokenizer).tolist() == [tokenizer.encode("Every effort")]
    idx = text_to_token_ids("What do llamas eat?", chat)  # the book's chat call
    assert idx.tolist() == [chat.encode("What do llamas eat?")]
    assert clean_text(token_ids_to_text(idx, tokenizer)) == ""
    sp = LlamaTokenizer(str(train_tiny_sentencepiece(SAMPLE_TEXT, tmp_path, vocab_size=300)))
    assert token_ids_to_text(text_to_token_ids("Every effort moves", sp), sp) == "Every effort moves"
