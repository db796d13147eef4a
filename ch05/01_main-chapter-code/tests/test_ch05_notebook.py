"""ch05.ipynb: committed state, and the functions it writes behave like ch05_utils.py's.

The notebook writes the chapter's functions cell by cell, while the scripts import them
from `ch05_utils.py`. These tests take the function definitions out of the notebook's
cells and check that they compute the same as the module, so the two cannot drift.
(tests/test_notebooks.py runs the whole notebook at small scale.)
"""

import ast
from pathlib import Path

import nbformat
import pytest
import torch

import ch05_utils
from previous_chapters import GPT_CONFIG_124M, GPTModel, create_dataloader_v1, get_tokenizer

NOTEBOOK = Path(__file__).resolve().parent.parent / "ch05.ipynb"
WEIGHTS_TAG = "needs-openai-weights"
CHAPTER_FUNCTIONS = (
    "text_to_token_ids", "token_ids_to_text", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
    "generate_and_print_sample", "train_model_simple", "plot_losses", "generate",
)
TINY = {**GPT_CONFIG_124M, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2}


@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def notebook_functions(nb):
    """The chapter's functions as the notebook defines them (only the `def`s are executed)."""
    import math
    import time

    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    from previous_chapters import generate_text_simple

    namespace = {"math": math, "time": time, "plt": plt, "torch": torch, "F": F, "Path": Path,
                 "GPTModel": GPTModel, "generate_text_simple": generate_text_simple}
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.source.lstrip().startswith("%"):
            continue
        defs = [node for node in ast.parse(cell.source).body
                if isinstance(node, ast.FunctionDef) and node.name in CHAPTER_FUNCTIONS]
        exec(compile(ast.Module(body=defs, type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
        found.update(node.name for node in defs)
    assert found == set(CHAPTER_FUNCTIONS), f"the notebook does not define {set(CHAPTER_FUNCTIONS) - found}"
    return namespace


@pytest.fixture(scope="module")
def tiny_setup():
    text = ch05_utils.read_text_file(ch05_utils.the_verdict_path())[:1000]  # about 8 batches
    torch.manual_seed(0)
    model = GPTModel(TINY)
    loader = create_dataloader_v1(text, batch_size=2, max_length=16, stride=16, shuffle=False, drop_last=False)
    return model, loader, get_tokenizer()


def test_committed_notebook_is_clean(nb):
    """One parameters cell, CI overrides, kernel python3, no errors, weights cells without outputs."""
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code_cells) == 1
    assert isinstance(nb.metadata.get("ci_parameters"), dict) and nb.metadata["ci_parameters"]
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in code_cells:
        assert all(o.output_type != "error" for o in cell.outputs), cell.source[:80]
    weights_cells = [c for c in code_cells if WEIGHTS_TAG in c.metadata.get("tags", [])]
    assert weights_cells, f"section 5.5 should tag its cells {WEIGHTS_TAG!r}"
    for cell in weights_cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    # every cell that touches the downloaded weights (or what is built from them) is tagged
    for cell in code_cells:
        if any(name in cell.source for name in ("download_and_load_gpt2(", "params[", "NEW_CONFIG", "gpt,")):
            assert WEIGHTS_TAG in cell.metadata.get("tags", []), cell.source[:80]
    # the rest ran: every untagged code cell has an execution count
    for cell in code_cells:
        if WEIGHTS_TAG not in cell.metadata.get("tags", []):
            assert cell.execution_count is not None, cell.source[:80]


def test_text_helpers_match(notebook_functions):
    tokenizer = get_tokenizer()
    text = "Every effort moves you<|endoftext|> forward."
    ids = notebook_functions["text_to_token_ids"](text, tokenizer)
    assert torch.equal(ids, ch05_utils.text_to_token_ids(text, tokenizer))
    assert notebook_functions["token_ids_to_text"](ids, tokenizer) == text


def test_losses_match(notebook_functions, tiny_setup):
    model, loader, _ = tiny_setup
    model.eval()
    x, y = next(iter(loader))
    with torch.no_grad():
        assert torch.equal(notebook_functions["calc_loss_batch"](x, y, model, "cpu"),
                           ch05_utils.calc_loss_batch(x, y, model, "cpu"))
        for num_batches in (None, 2, 1000):
            assert notebook_functions["calc_loss_loader"](loader, model, "cpu", num_batches) == \
                ch05_utils.calc_loss_loader(loader, model, "cpu", num_batches)
    assert notebook_functions["evaluate_model"](model, loader, loader, "cpu", 2) == \
        ch05_utils.evaluate_model(model, loader, loader, "cpu", 2)


@pytest.mark.parametrize("kwargs", [
    {},
    {"temperature": 1.5},
    {"temperature": 0.7, "top_k": 5},
    {"top_k": 1},
    {"temperature": 1.0, "top_k": 50, "eos_id": 13},
])
def test_generate_matches(notebook_functions, tiny_setup, kwargs):
    model, _, tokenizer = tiny_setup
    model.eval()
    idx = ch05_utils.text_to_token_ids("Every effort moves you", tokenizer).repeat(3, 1)
    outs = [generate(model, idx, max_new_tokens=20, context_size=16,
                     generator=torch.Generator().manual_seed(1), **kwargs)
            for generate in (notebook_functions["generate"], ch05_utils.generate)]
    assert torch.equal(outs[0], outs[1])


def test_generate_rejects_bad_arguments(notebook_functions, tiny_setup):
    model, _, _ = tiny_setup
    idx = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        notebook_functions["generate"](model, idx, 1, 16, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        notebook_functions["generate"](model, idx, 1, 16, top_k=0)


def test_training_loop_matches(notebook_functions, tiny_setup, capsys):
    """Same seed, same shuffled data order over two epochs, dropout on: the notebook's
    loop and ch05_utils' give identical losses."""
    text = ch05_utils.read_text_file(ch05_utils.the_verdict_path())[:1000]
    tokenizer = tiny_setup[2]
    results = []
    for train in (notebook_functions["train_model_simple"], ch05_utils.train_model_simple):
        torch.manual_seed(123)
        model = GPTModel(TINY)
        loader, _ = ch05_utils.create_train_val_loaders(text, TINY, batch_size=2, seed=123)  # shuffles
        optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
        results.append(train(model, loader, loader, optimizer, "cpu", num_epochs=2, eval_freq=3, eval_iter=1,
                             start_context="Every effort", tokenizer=tokenizer))
        results.append(capsys.readouterr().out)
    nb_losses, nb_out, utils_losses, utils_out = results
    assert nb_losses == utils_losses
    assert nb_out == utils_out  # the same evaluation lines and samples
    assert len(nb_losses[0]) == len(range(0, 2 * len(loader), 3))


def test_plot_losses_draws_both_axes(notebook_functions, tmp_path):
    fig = notebook_functions["plot_losses"]([0, 1, 2], [0, 64, 128], [9.0, 7.0, 5.0], [9.5, 8.0, 7.5],
                                            tmp_path / "loss.png")
    ax1, ax2 = fig.axes
    assert (ax1.get_xlabel(), ax2.get_xlabel()) == ("Epochs", "Tokens seen")
    assert [line.get_ydata().tolist() for line in ax1.lines] == [[9.0, 7.0, 5.0], [9.5, 8.0, 7.5]]
    assert (tmp_path / "loss.png").stat().st_size > 0
