"""The code the three notebooks write in their cells computes what llama3.py and transformers compute.

Each notebook teaches the book's functions and classes in its own cells, and
`standalone-llama32.ipynb` must stand alone, so the model, RoPE, attention,
tokenizer and weight loading exist twice: in the notebooks and in `llama3.py`. These
tests take the definitions out of the committed notebooks (imports, `def`s, `class`es
and UPPER_CASE constants; nothing that downloads) and check that they agree with the
module and with Hugging Face's `transformers`, so the two copies cannot drift apart.
"""

import ast
import warnings
from pathlib import Path
from types import SimpleNamespace

import llama3
import nbformat
import pytest
import torch
from tiny_llama_checkpoint import (
    SAMPLE_TEXT,
    hf_llama_config,
    make_tiny_meta_llama2_checkpoint,
    train_byte_bpe,
    write_tiktoken_ranks,
)
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

FOLDER = Path(__file__).resolve().parent.parent
WEIGHTS_TAG = "needs-meta-weights"
VOCAB = 300


def notebook_definitions(name: str) -> SimpleNamespace:
    """Run only the imports, definitions and constants of a notebook's cells; return what they define."""
    nb = nbformat.read(FOLDER / name, as_version=4)
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type != "code" or WEIGHTS_TAG in cell.metadata.get("tags", []):
            continue
        keep = [node for node in ast.parse(cell.source).body
                if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.ClassDef)
                or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                         for t in node.targets))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(ast.Module(body=keep, type_ignores=[]), name, "exec"), namespace)
    return SimpleNamespace(**namespace)


@pytest.fixture(scope="module")
def nb_llama2():
    return notebook_definitions("converting-gpt-to-llama2.ipynb")


@pytest.fixture(scope="module")
def nb_llama3():
    return notebook_definitions("converting-llama2-to-llama3.ipynb")


@pytest.fixture(scope="module")
def nb_standalone():
    return notebook_definitions("standalone-llama32.ipynb")


@pytest.fixture(scope="module")
def ranks_file(tmp_path_factory):
    return write_tiktoken_ranks(train_byte_bpe(SAMPLE_TEXT, 150), tmp_path_factory.mktemp("tok") / "tokenizer.model")


def hf_rope(head_dim: int, theta: float, context: int, scaling: dict | None = None):
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=context,
                      rope_theta=theta, rope_scaling=scaling)
    return LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(context)[None])


LLAMA31_FREQ = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 8192}
HF_LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}


# ---------------------------------------------------------------- converting-gpt-to-llama2.ipynb

def test_llama2_notebook_rope_matches_transformers_and_module(nb_llama2):
    cos, sin = nb_llama2.precompute_rope_params(head_dim=16, context_length=4096)  # the course's call
    hf_cos, hf_sin = hf_rope(16, 10_000.0, 4096)
    torch.testing.assert_close(cos, hf_cos[0])
    torch.testing.assert_close(sin, hf_sin[0])
    module_cos, module_sin = llama3.compute_rope_params(16, 10_000, 4096)
    assert torch.equal(cos, module_cos) and torch.equal(sin, module_sin)
    queries, keys = torch.randn(1, 4, 4096, 16), torch.randn(1, 4, 4096, 16)
    ref_q, ref_k = apply_rotary_pos_emb(queries, keys, hf_cos, hf_sin)
    torch.testing.assert_close(nb_llama2.compute_rope(queries, cos, sin), ref_q)
    torch.testing.assert_close(nb_llama2.compute_rope(keys, cos, sin), ref_k)
    assert torch.equal(nb_llama2.compute_rope(queries, cos, sin), llama3.apply_rope(queries, cos, sin))


def test_llama2_notebook_silu_and_rmsnorm(nb_llama2):
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(nb_llama2.SiLU()(x), torch.nn.functional.silu(x))
    torch.testing.assert_close(nb_llama2.RMSNorm(emb_dim=4, eps=1e-5)(x), torch.nn.RMSNorm(4, eps=1e-5)(x))
    assert torch.equal(nb_llama2.RMSNorm(emb_dim=4)(x), llama3.RMSNorm(4)(x))


def test_llama2_notebook_loads_metas_layout_like_transformers_and_the_module(nb_llama2, tmp_path):
    folder, hf_model = make_tiny_meta_llama2_checkpoint(tmp_path)
    weights = torch.load(folder / "consolidated.00.pth", weights_only=True)
    c = hf_model.config
    cfg = {"vocab_size": c.vocab_size, "context_length": 128, "emb_dim": c.hidden_size, "n_heads": 8,
           "n_layers": c.num_hidden_layers, "hidden_dim": c.intermediate_size, "dtype": torch.float32}
    model = nb_llama2.Llama2Model(cfg).eval()
    nb_llama2.load_weights_into_llama(model, cfg, weights)
    module_model = llama3.Llama3Model({**cfg, "n_kv_groups": 8, "rope_base": 10_000.0, "rope_freq": None}).eval()
    llama3.load_weights_into_llama(module_model, cfg, weights)
    idx = torch.randint(0, cfg["vocab_size"], (2, 50))
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(logits, hf_model(idx).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, module_model(idx), rtol=1e-5, atol=1e-5)
    w = torch.randn(64, 64)
    assert torch.equal(nb_llama2.permute(w, 8, 64, 64), llama3.permute(w, 8, 64, 64))
    tok = nb_llama2.LlamaTokenizer(folder / "tokenizer.model")
    module_tok = llama3.LlamaTokenizer(folder / "tokenizer.model")
    text = "What do llamas eat? Zürich 🦙"
    assert tok.encode(text) == module_tok.encode(text)
    assert tok.encode(text, bos=True) == module_tok.encode(text, bos=True)
    assert tok.decode(tok.encode(text)) == module_tok.decode(tok.encode(text)) == text


def test_llama2_notebook_sizes_are_the_books(nb_llama2):
    with torch.device("meta"):
        model = nb_llama2.Llama2Model(nb_llama2.LLAMA2_CONFIG_7B)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert f"{nb_llama2.calc_model_memory_size(model, input_dtype=torch.float32):.2f}" == "52.33"
    assert f"{nb_llama2.calc_model_memory_size(model, input_dtype=torch.bfloat16):.2f}" == "26.17"
    assert nb_llama2.calc_model_memory_size(model) == llama3.calc_model_memory_size(model)


# ---------------------------------------------------------------- converting-llama2-to-llama3.ipynb

def test_llama3_notebook_rope_with_scaling_matches_transformers_and_module(nb_llama3):
    cos, sin = nb_llama3.precompute_rope_params(head_dim=16, theta_base=500_000, context_length=8192,
                                                freq_config=LLAMA31_FREQ)  # the course's call
    hf_cos, hf_sin = hf_rope(16, 500_000.0, 8192, HF_LLAMA31)
    torch.testing.assert_close(cos, hf_cos[0])
    torch.testing.assert_close(sin, hf_sin[0])
    module_cos, module_sin = llama3.compute_rope_params(16, 500_000, 8192, LLAMA31_FREQ)
    assert torch.equal(cos, module_cos) and torch.equal(sin, module_sin)
    unscaled, _ = nb_llama3.precompute_rope_params(16, 500_000, 8192)
    assert torch.equal(unscaled, llama3.compute_rope_params(16, 500_000, 8192)[0])
    assert not torch.allclose(unscaled, cos)


@pytest.mark.parametrize("notebook", ["nb_llama3", "nb_standalone"])
def test_notebook_grouped_query_attention_equals_the_module(notebook, request):
    nb = request.getfixturevalue(notebook)
    torch.manual_seed(0)
    ours = nb.GroupedQueryAttention(64, 64, 8, 2)
    module = llama3.GroupedQueryAttention(64, 64, 8, 2)
    module.load_state_dict(ours.state_dict())
    cos, sin = llama3.compute_rope_params(8, 500_000, 16)
    x = torch.randn(2, 16, 64)
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask, cos, sin), module(x, mask, cos, sin), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x, mask, cos, sin), module(x, None, cos, sin), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version", ["3", "3.1", "3.2"])
@pytest.mark.parametrize("notebook", ["nb_llama3", "nb_standalone"])
def test_notebook_llama3_model_matches_transformers_and_the_module(notebook, version, request, capsys):
    nb = request.getfixturevalue(notebook)
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_llama_config(version, VOCAB)).eval()
    cfg = llama3.config_from_hf(hf_model.config.to_dict(), dtype=torch.float32)
    weights = hf_model.state_dict()
    if cfg["tie_embeddings"]:
        del weights["lm_head.weight"]  # as in Meta's Llama 3.2 files
    model = nb.Llama3Model(cfg).eval()
    nb.load_weights_into_llama(model, {"n_layers": cfg["n_layers"], "hidden_dim": cfg["hidden_dim"]}, weights)
    assert (model.out_head.weight is model.tok_emb.weight) == cfg["tie_embeddings"]
    assert ("Model uses weight tying." in capsys.readouterr().out) == cfg["tie_embeddings"]
    module_model = llama3.Llama3Model(cfg).eval()
    module_model.load_state_dict(model.state_dict())
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(logits, hf_model(idx).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, module_model(idx), rtol=1e-5, atol=1e-5)
    assert nb.count_unique_parameters(model) == llama3.count_unique_parameters(module_model)


@pytest.mark.parametrize("notebook", ["nb_llama3", "nb_standalone"])
def test_notebook_tokenizer_and_chat_format_equal_the_module(notebook, request, ranks_file):
    nb = request.getfixturevalue(notebook)
    tok, module_tok = nb.Tokenizer(ranks_file), llama3.Tokenizer(ranks_file)
    assert tok.special == module_tok.special
    for text in ("What do llamas eat?", "Zürich 1234 🦙\n\n  spaces", ""):
        assert tok.encode(text) == module_tok.encode(text)
        assert tok.encode(text, True, True) == module_tok.encode(text, True, True)
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError):  # both refuse a special token's text typed by a user
        tok.encode("hi <|eot_id|>")
    chat, module_chat = nb.ChatFormat(tok), llama3.ChatFormat(module_tok, default_system="Be brief.")
    assert chat.encode("Hello World!") == llama3.ChatFormat(module_tok).encode("Hello World!")
    assert nb.ChatFormat(tok, default_system="Be brief.").encode("Hi") == module_chat.encode("Hi")
    assert chat.encode("Hi", "Sys.") == module_chat.encode("Hi", "Sys.")
    assert chat.decode(chat.encode("Hi")) == module_chat.decode(chat.encode("Hi"))
    answer = chat.decode(chat.encode("Hi") + tok.encode("Grass. "))
    assert nb.clean_text(answer) == llama3.clean_text(answer) == "Grass."


# ---------------------------------------------------------------- standalone-llama32.ipynb

def test_standalone_rope_functions_equal_the_module(nb_standalone):
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = nb_standalone.compute_rope_params(64, 500_000.0, 1024, LLAMA31_FREQ, dtype=dtype)
        module_cos, module_sin = llama3.compute_rope_params(64, 500_000.0, 1024, LLAMA31_FREQ, dtype=dtype)
        assert torch.equal(cos, module_cos) and torch.equal(sin, module_sin)
    x = torch.randn(2, 3, 20, 64).to(torch.bfloat16)
    assert torch.equal(nb_standalone.apply_rope(x, cos, sin), llama3.apply_rope(x, cos, sin))


def test_standalone_course_equivalence_check(nb_standalone):
    """The course's own test of this notebook: vocabulary 257, 2 key/value groups, RoPE factor 32."""
    cfg = {"vocab_size": 257, "context_length": 8192, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 64,
           "n_kv_groups": 2, "rope_base": 500_000.0, "dtype": torch.float32,
           "rope_freq": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_context_length": 8192}}
    ours = nb_standalone.Llama3Model(cfg)
    hf_cfg = LlamaConfig(vocab_size=257, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=500_000.0, tie_word_embeddings=False,
                         rope_scaling={**HF_LLAMA31, "factor": 32.0})
    theirs = LlamaForCausalLM(hf_cfg)
    nb_standalone.load_weights_into_llama(ours, {"n_layers": 2, "hidden_dim": 64}, theirs.state_dict())
    x = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_standalone_generation_functions_equal_the_module(nb_standalone, ranks_file):
    tok = nb_standalone.Tokenizer(ranks_file)
    chat = nb_standalone.ChatFormat(tok)
    idx = nb_standalone.text_to_token_ids("What do llamas eat?", chat)
    assert idx.tolist() == [chat.encode("What do llamas eat?")]
    assert nb_standalone.token_ids_to_text(idx, tok) == tok.decode(chat.encode("What do llamas eat?"))
    torch.manual_seed(0)
    model = llama3.Llama3Model(llama3.config_from_hf(hf_llama_config("3.2", tok.model.n_vocab).to_dict(),
                                                     dtype=torch.float32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # varied greedy choices
    for eos_id in (None, 7):
        expected = llama3.generate(model, idx, 20, 64, eos_id=eos_id, use_cache=True)
        assert torch.equal(nb_standalone.generate(model, idx, 20, 64, eos_id=eos_id), expected)
    torch.manual_seed(5)
    sampled = nb_standalone.generate(model, idx, 10, 64, temperature=1.0, top_k=5)
    torch.manual_seed(5)
    assert torch.equal(sampled, llama3.generate(model, idx, 10, 64, temperature=1.0, top_k=5))


def test_standalone_sizes_are_the_books(nb_standalone):
    with torch.device("meta"):
        model = nb_standalone.Llama3Model(nb_standalone.LLAMA32_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 1_498_482_688
    assert f"{nb_standalone.calc_model_memory_size(model, input_dtype=torch.float32):.2f}" == "11.23"
    assert nb_standalone.calc_model_memory_size(model, torch.bfloat16) == llama3.calc_model_memory_size(
        model, torch.bfloat16)
    model.out_head.weight = model.tok_emb.weight
    assert nb_standalone.count_unique_parameters(model) == 1_235_814_400
