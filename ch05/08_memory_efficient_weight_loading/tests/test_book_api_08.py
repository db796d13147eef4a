"""The book's memory-efficient loading recipes, made the book's way, work with our GPTModel.

A reference GPTModel written as the book writes it (tests/book_reference.py: causal mask
as a persistent float buffer), so the tests check interchange with the book's model:
the book's `model.pth` loads into ours strictly and ours into the book's, the meta-device
recipe (`load_state_dict(assign=True)`) and the `to_empty` recipe give the book model's
logits, and a model left with tensors that were never loaded is refused.
"""

import ast
from pathlib import Path

import nbformat
import pytest
import torch
from book_reference import BookGPTModel
from memory_efficient_loading import METHODS, check_fully_loaded
from previous_chapters import GPTModel

NOTEBOOK = Path(__file__).resolve().parent.parent / "memory-efficient-state-dict.ipynb"
BASE_CONFIG = {"vocab_size": 50257, "context_length": 32, "drop_rate": 0.0, "qkv_bias": True,
               "emb_dim": 64, "n_layers": 2, "n_heads": 4}


#####################################
# Fixtures
#####################################

@pytest.fixture(scope="module")
def book_model():
    torch.manual_seed(123)
    return BookGPTModel(BASE_CONFIG).eval()


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, BASE_CONFIG["vocab_size"], (2, BASE_CONFIG["context_length"]),
                         generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def book_logits(book_model, idx):
    with torch.no_grad():
        return book_model(idx)


@pytest.fixture
def model_pth(book_model, tmp_path, monkeypatch):
    """The book's `torch.save(model.state_dict(), "model.pth")`, in a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    torch.save(book_model.state_dict(), "model.pth")
    return Path("model.pth")


def logits_of(model, idx):
    with torch.no_grad():
        return model.eval()(idx)


def assert_same_logits(ours, book):
    # Same function: only the order of floating-point operations differs between the two classes.
    torch.testing.assert_close(ours, book, rtol=1e-5, atol=1e-5)


#####################################
# State dicts both ways
#####################################

def test_state_dict_keys_and_parameter_count_are_the_books(book_model):
    ours = GPTModel(BASE_CONFIG)
    assert list(ours.state_dict()) == list(book_model.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in book_model.parameters())


def test_books_model_pth_loads_strictly_into_ours(model_pth, idx, book_logits):
    device = torch.device("cpu")
    model = GPTModel(BASE_CONFIG)
    model.load_state_dict(torch.load(model_pth, map_location=device, weights_only=True))
    assert_same_logits(logits_of(model, idx), book_logits)


def test_our_state_dict_loads_strictly_into_the_books(idx, tmp_path):
    torch.manual_seed(7)
    ours = GPTModel(BASE_CONFIG)
    torch.save(ours.state_dict(), tmp_path / "model.pth")
    book = BookGPTModel(BASE_CONFIG)
    book.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    assert_same_logits(logits_of(ours, idx), logits_of(book, idx))


#####################################
# The book's recipes, with the book's calls
#####################################

def test_meta_device_and_assign_recipe(model_pth, idx, book_logits):
    device = torch.device("cpu")
    with torch.device("meta"):
        model = GPTModel(BASE_CONFIG)
    model.load_state_dict(
        torch.load("model.pth", map_location=device, weights_only=True, mmap=True),
        assign=True,
    )
    check_fully_loaded(model)  # the masks came from the state dict, as in the book
    assert_same_logits(logits_of(model, idx), book_logits)


def test_to_empty_then_copy_every_tensor_recipe(model_pth, idx, book_logits):
    device = torch.device("cpu")
    with torch.device("meta"):
        model = GPTModel(BASE_CONFIG)
    model = model.to_empty(device=device)
    state_dict = torch.load("model.pth", map_location=device, weights_only=True)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():  # parameters and buffers: every tensor
            tensor.copy_(state_dict[name])
    check_fully_loaded(model)
    assert_same_logits(logits_of(model, idx), book_logits)


def test_to_empty_with_parameters_only_leaves_the_masks_uninitialized_and_is_caught(model_pth):
    """The book's loop over `named_parameters()` never fills the mask buffers after
    `to_empty`; they hold whatever bytes were in memory, which our check refuses."""
    device = torch.device("cpu")
    with torch.device("meta"):
        model = GPTModel(BASE_CONFIG)
    model = model.to_empty(device=device)
    for _, buffer in model.named_buffers():
        buffer.fill_(0.5)  # make "uninitialized" deterministic: not the causal mask
    state_dict = torch.load("model.pth", map_location=device, weights_only=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state_dict[name])
    with pytest.raises(ValueError, match=r"trf_blocks.0.att.mask is not the causal mask"):
        check_fully_loaded(model)


def test_meta_model_with_a_tensor_never_loaded_is_refused(model_pth):
    with torch.device("meta"):
        model = GPTModel(BASE_CONFIG)
    state_dict = torch.load("model.pth", weights_only=True)
    del state_dict["trf_blocks.1.norm2.shift"]
    model.load_state_dict(state_dict, assign=True, strict=False)
    with pytest.raises(ValueError, match=r"never loaded.*trf_blocks.1.norm2.shift"):
        check_fully_loaded(model)


#####################################
# Our loaders read the book's files
#####################################

@pytest.mark.parametrize("method", ["naive", "sequential", "meta_assign", "mmap"])
@pytest.mark.parametrize("layout", ["model.pth", "model_and_optimizer.pth", "checkpoint.pth"])
def test_loaders_read_the_books_files_and_gpt_train_checkpoints(method, layout, book_model, idx, book_logits,
                                                              tmp_path):
    state_dict = book_model.state_dict()
    optimizer = torch.optim.AdamW(book_model.parameters(), lr=1e-4)
    content = {
        "model.pth": state_dict,
        "model_and_optimizer.pth": {"model_state_dict": state_dict, "optimizer_state_dict": optimizer.state_dict()},
        "checkpoint.pth": {"model": state_dict, "config": BASE_CONFIG, "optimizer": optimizer.state_dict()},
    }[layout]
    torch.save(content, tmp_path / layout)
    cfg = None if layout == "checkpoint.pth" else BASE_CONFIG
    assert_same_logits(logits_of(METHODS[method](tmp_path / layout, cfg, "cpu"), idx), book_logits)


def test_safetensors_of_the_books_state_dict(book_model, idx, book_logits, tmp_path):
    from safetensors.torch import save_file

    save_file(book_model.state_dict(), tmp_path / "model.safetensors")
    model = METHODS["safetensors_lazy"](tmp_path / "model.safetensors", BASE_CONFIG, "cpu")
    assert_same_logits(logits_of(model, idx), book_logits)


#####################################
# The notebook's functions (the book's names)
#####################################

BOOK_FUNCTIONS = ("start_memory_tracking", "print_memory_usage", "cleanup", "memory_usage_in_gb",
                  "baseline", "load_sequentially", "load_sequentially_with_meta", "best_practices",
                  "load_individual_weights")
LOADING_FUNCTIONS = ("baseline", "load_sequentially", "load_sequentially_with_meta", "best_practices",
                     "load_individual_weights")


@pytest.fixture
def notebook_functions(model_pth, book_model):
    """The book's functions as the notebook writes them, run against this test's files.

    Only the `def`s of the notebook are executed, in a namespace holding what the
    notebook defines before them (config, device, imports).
    """
    import gc
    import os
    import time

    import memory_efficient_loading

    torch.manual_seed(0)
    Path("model_parameters").mkdir()
    for name, tensor in book_model.state_dict().items():  # the files the notebook writes for section 7
        torch.save(tensor, f"model_parameters/{name}.pt")
    namespace = {"torch": torch, "gc": gc, "os": os, "time": time, "GPTModel": GPTModel,
                 "BASE_CONFIG": BASE_CONFIG, "device": torch.device("cpu"), **vars(memory_efficient_loading)}
    namespace["rss"] = memory_efficient_loading.RSSPeak()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        defs = [node for node in ast.parse(cell.source).body
                if isinstance(node, ast.FunctionDef) and node.name in BOOK_FUNCTIONS]
        exec(compile(ast.Module(body=defs, type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
        found.update(node.name for node in defs)
    assert found == set(BOOK_FUNCTIONS), f"the notebook does not define {set(BOOK_FUNCTIONS) - found}"
    return namespace


@pytest.mark.parametrize("name", LOADING_FUNCTIONS)
def test_notebook_loading_functions_give_the_books_logits(name, notebook_functions, idx, book_logits, capsys):
    model = notebook_functions[name]()
    check_fully_loaded(model)
    assert_same_logits(logits_of(model, idx), book_logits)
    assert "memory" in capsys.readouterr().out  # each reports its memory use, as in the book


def test_memory_usage_in_gb_measures_the_function(notebook_functions):
    def allocate():
        block = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB, touched
        del block

    assert 0.2 < notebook_functions["memory_usage_in_gb"](allocate) < 1.0


def test_committed_notebook_is_clean():
    """One switch for the smoke test; every cell ran here, with its code in the cell (not
    printed from the module); no machine paths, warnings or tracebacks in the outputs."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["ci_parameters"] == {"SMOKE_TEST": True}
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code_cells) == 1
    for cell in code_cells:
        assert cell.execution_count is not None, cell.source[:60]
        assert "getsource" not in cell.source
        assert "memory_loading_smoke_test" not in cell.source or "if SMOKE_TEST:" in cell.source
        for output in cell.outputs:
            assert output.output_type != "error"
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            for bad in ("Traceback", "Warning", "/work/", "/tmp/", "/home/"):
                assert bad not in text, (bad, cell.source[:60])
