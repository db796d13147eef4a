"""The course's code for this folder works here, with the book's names, calls and files.

A reference GPTModel is written as the book writes it (tests/book_reference.py: causal
mask as a persistent float buffer). The tests check that state dicts interchange with it both ways (strict
loading, same logits), as `.pth` and as `.safetensors`, that the converter's outputs load
into it the book's way, and that the helpers the course's notebooks define, which our
notebooks write in their cells under the same names (`assign` and
`load_weights_into_gpt` for a safetensors file, `assign_check` and `load_weights` for
`transformers`' GPT2Model), give `transformers`' logits and the converter's tensors.
"""

import ast
from pathlib import Path

import nbformat
import pytest
import torch
from book_reference import BookGPTModel
from convert_gpt2_weights import build_gpt, hf_to_gpt_state_dict, main
from previous_chapters import GPTModel
from safetensors.torch import load_file, save_file

FOLDER = Path(__file__).resolve().parent.parent
BASE_CONFIG = {"vocab_size": 50257, "context_length": 64, "drop_rate": 0.0, "qkv_bias": True,
               "emb_dim": 48, "n_layers": 2, "n_heads": 4}
TOL = 1e-5


#####################################
# Fixtures
#####################################

@pytest.fixture(scope="module")
def hf_model():
    """A small random transformers GPT-2 (every tensor random), the stand-in for OpenAI's."""
    from weight_loading_smoke_test import tiny_hf_gpt2

    return tiny_hf_gpt2()


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, BASE_CONFIG["vocab_size"], (2, BASE_CONFIG["context_length"]),
                         generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


def logits_of(model, idx):
    with torch.no_grad():
        return model.eval()(idx)


def assert_same_logits(a, b):
    torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


@pytest.fixture(scope="module")
def book_model():
    torch.manual_seed(123)
    return BookGPTModel(BASE_CONFIG).eval()


#####################################
# State dicts both ways, as .pth and .safetensors
#####################################

def test_state_dict_keys_and_parameter_count_are_the_books(book_model):
    ours = GPTModel(BASE_CONFIG)
    assert list(ours.state_dict()) == list(book_model.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in book_model.parameters())


def test_books_pth_and_safetensors_load_strictly_into_ours(book_model, idx, tmp_path):
    """weight-loading-pytorch.ipynb's calls: load_state_dict(torch.load(...)) and load_state_dict(load_file(...))."""
    file_name = str(tmp_path / "gpt2-small-124M.pth")
    torch.save(book_model.state_dict(), file_name)
    gpt = GPTModel(BASE_CONFIG)
    gpt.load_state_dict(torch.load(file_name, weights_only=True))
    assert_same_logits(logits_of(gpt, idx), logits_of(book_model, idx))

    file_name = str(tmp_path / "gpt2-small-124M.safetensors")
    save_file(book_model.state_dict(), file_name)
    gpt = GPTModel(BASE_CONFIG)
    gpt.load_state_dict(load_file(file_name))
    assert_same_logits(logits_of(gpt, idx), logits_of(book_model, idx))


def test_our_pth_and_safetensors_load_strictly_into_the_books(idx, tmp_path):
    torch.manual_seed(7)
    ours = GPTModel(BASE_CONFIG).eval()
    torch.save(ours.state_dict(), tmp_path / "model.pth")
    save_file(ours.state_dict(), tmp_path / "model.safetensors")
    for state_dict in (torch.load(tmp_path / "model.pth", weights_only=True),
                       load_file(tmp_path / "model.safetensors")):
        book = BookGPTModel(BASE_CONFIG)
        book.load_state_dict(state_dict)
        assert_same_logits(logits_of(book, idx), logits_of(ours, idx))


def test_converter_outputs_load_the_books_way(hf_model, idx, hf_logits, tmp_path):
    """An exported .safetensors is the course's Hub format: `model.load_state_dict(load_file(...))`."""
    hf_model.save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "gpt2.safetensors"), "--to", "safetensors"]) == 0
    assert main([str(tmp_path / "hf"), str(tmp_path / "gpt2.pth")]) == 0
    book = BookGPTModel(BASE_CONFIG)
    book.load_state_dict(load_file(tmp_path / "gpt2.safetensors"))
    assert_same_logits(logits_of(book, idx), hf_logits)
    book = BookGPTModel(BASE_CONFIG)
    book.load_state_dict(torch.load(tmp_path / "gpt2.pth", weights_only=True)["model"])
    assert_same_logits(logits_of(book, idx), hf_logits)


def test_converter_reads_the_books_model_pth_and_model_and_optimizer_pth(book_model, idx, tmp_path):
    optimizer = torch.optim.AdamW(book_model.parameters())
    torch.save(book_model.state_dict(), tmp_path / "model.pth")
    torch.save({"model_state_dict": book_model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    for name in ("model.pth", "model_and_optimizer.pth"):
        out = tmp_path / f"from-{name}.safetensors"
        assert main([str(tmp_path / name), str(out), "--to", "safetensors", "--n-heads", "4"]) == 0
        gpt = GPTModel(BASE_CONFIG)
        gpt.load_state_dict(load_file(out))
        assert_same_logits(logits_of(gpt, idx), logits_of(book_model, idx))


#####################################
# The helpers the course's notebooks define, as our notebooks write them
#####################################

def notebook_functions(notebook: str, names: tuple[str, ...]) -> dict:
    """The functions `names` as the notebook defines them (only the `def`s are executed)."""
    nb = nbformat.read(FOLDER / notebook, as_version=4)
    namespace = {"torch": torch}
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        defs = [node for node in ast.parse(cell.source).body
                if isinstance(node, ast.FunctionDef) and node.name in names]
        exec(compile(ast.Module(body=defs, type_ignores=[]), notebook, "exec"), namespace)
        found.update(node.name for node in defs)
    assert found == set(names), f"{notebook} does not define {set(names) - found}"
    return namespace


def test_safetensors_notebook_load_weights_into_gpt(hf_model, idx, hf_logits):
    """The Hub's model.safetensors names tensors `wte.weight`, `h.0...` (no prefix, no lm_head)."""
    fns = notebook_functions("weight-loading-hf-safetensors.ipynb", ("assign", "load_weights_into_gpt"))
    params = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    gpt = GPTModel(BASE_CONFIG)
    fns["load_weights_into_gpt"](gpt, params)
    assert_same_logits(logits_of(gpt, idx), hf_logits)
    expected = hf_to_gpt_state_dict(params, BASE_CONFIG["n_layers"])
    for name, tensor in gpt.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with pytest.raises(ValueError, match="Shape mismatch"):
        fns["assign"](gpt.pos_emb.weight, params["wte.weight"])


def test_transformers_notebook_load_weights(hf_model, idx, hf_logits):
    """`load_weights(gpt, gpt_hf)` with the GPT2Model the course's notebook loads."""
    fns = notebook_functions("weight-loading-hf-transformers.ipynb", ("assign_check", "load_weights"))
    gpt = GPTModel(BASE_CONFIG)
    fns["load_weights"](gpt, hf_model.transformer)  # GPT2LMHeadModel.transformer is a GPT2Model
    assert_same_logits(logits_of(gpt, idx), hf_logits)
    expected = hf_to_gpt_state_dict(hf_model.state_dict(), BASE_CONFIG["n_layers"])
    for name, tensor in gpt.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    left = gpt.out_head.weight
    copy = fns["assign_check"](left, left)
    assert torch.equal(copy, left) and copy.data_ptr() != left.data_ptr()  # a copy, as the course's
    with pytest.raises(ValueError, match="Shape mismatch"):
        fns["assign_check"](gpt.pos_emb.weight, left)


def test_book_names_in_the_notebooks():
    """The settings the course's notebooks define exist under the same names in ours."""
    expected = {
        "weight-loading-pytorch.ipynb": ("BASE_CONFIG", "model_configs", "CHOOSE_MODEL", "file_name", "url", "gpt"),
        "weight-loading-hf-transformers.ipynb": ("BASE_CONFIG", "model_configs", "CHOOSE_MODEL", "model_names",
                                                 "gpt_hf", "gpt"),
        "weight-loading-hf-safetensors.ipynb": ("BASE_CONFIG", "model_configs", "CHOOSE_MODEL", "URL_DIR", "url",
                                                "output_file", "state_dict", "gpt"),
    }
    for notebook, names in expected.items():
        nb = nbformat.read(FOLDER / notebook, as_version=4)
        assigned = set()
        for cell in nb.cells:
            if cell.cell_type == "code":
                for node in ast.walk(ast.parse(cell.source)):
                    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                        assigned.add(node.id)
        assert set(names) <= assigned, (notebook, set(names) - assigned)


def test_load_weights_into_gpt_output_builds_through_the_converter(hf_model, idx, hf_logits):
    """The converter's checked path gives the same model as the notebooks' helpers."""
    state_dict = hf_to_gpt_state_dict(hf_model.state_dict(), BASE_CONFIG["n_layers"])
    assert_same_logits(logits_of(build_gpt(state_dict, BASE_CONFIG), idx), hf_logits)


@pytest.mark.parametrize("notebook", ["weight-loading-pytorch.ipynb", "weight-loading-hf-transformers.ipynb",
                                      "weight-loading-hf-safetensors.ipynb"])
def test_committed_notebook_is_clean(notebook):
    """One switch for the smoke test; cells that need the download have no outputs, the
    others ran here; no machine paths, warnings or tracebacks in what was committed."""
    nb = nbformat.read(FOLDER / notebook, as_version=4)
    assert nb.metadata["ci_parameters"] == {"SMOKE_TEST": True}
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code_cells) == 1
    for cell in code_cells:
        if "needs-download" in cell.metadata.get("tags", []):
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
        else:
            assert cell.execution_count is not None, cell.source[:60]
        assert "weight_loading_smoke_test" not in cell.source or "if SMOKE_TEST:" in cell.source
        for output in cell.outputs:
            assert output.output_type != "error"
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            for bad in ("Traceback", "Warning", "/work/", "/tmp/", "/home/"):
                assert bad not in text, (notebook, bad, cell.source[:60])
    # every cell that runs code using what the download gives is marked as needing it
    for cell in code_cells:
        statements = [n for n in ast.parse(cell.source).body if not isinstance(n, ast.FunctionDef)]
        run = ast.unparse(ast.Module(body=statements, type_ignores=[]))
        if any(name in run for name in ("file_name", "gpt_hf", "state_dict)", "gpt.")):
            assert "needs-download" in cell.metadata.get("tags", []), cell.source[:60]
