"""ch05.ipynb and exercise-solutions.ipynb: committed state, and the book's functions that
ch05.ipynb writes in its cells compute the same as the module versions.

The notebook writes the chapter's functions cell by cell, as the book teaches them; the
scripts import them from `previous_chapters.py`. These tests take the function
definitions out of the notebook's cells and check that they compute the same as the
module, so the two cannot drift. (tests/test_notebooks.py runs the notebooks at small
scale.)
"""

import ast
import collections
import math
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

import ch05_utils
import previous_chapters
from previous_chapters import GPT_CONFIG_124M, GPTModel, create_dataloader_v1, get_tokenizer

FOLDER = Path(__file__).resolve().parent.parent
NOTEBOOK = FOLDER / "ch05.ipynb"
NOTEBOOKS = [NOTEBOOK, FOLDER / "exercise-solutions.ipynb"]
WEIGHTS_TAG = "needs-openai-weights"
CHAPTER_FUNCTIONS = (
    "text_to_token_ids", "token_ids_to_text", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
    "generate_and_print_sample", "train_model_simple", "plot_losses", "generate", "print_sampled_tokens",
    "assign", "load_weights_into_gpt",
)
# Names whose use means a cell needs OpenAI's downloaded weights (or what is built from them).
WEIGHTS_NAMES = ("download_and_load_gpt2(", "params[", "NEW_CONFIG", "gpt,", "settings[")
TINY = {**GPT_CONFIG_124M, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2}
TOY_WORDS = {0: "closer", 1: "every", 2: "effort", 3: "forward"}


@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def notebook_functions(nb):
    """The chapter's functions as the notebook defines them (only the `def`s are executed)."""
    import time

    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    namespace = {"time": time, "plt": plt, "MaxNLocator": MaxNLocator, "torch": torch, "np": np,
                 "GPTModel": GPTModel, "generate_text_simple": previous_chapters.generate_text_simple,
                 "inverse_vocab": TOY_WORDS}
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.source.lstrip().startswith("%"):
            continue
        defs = [node for node in ast.parse(cell.source).body
                if isinstance(node, ast.FunctionDef) and node.name in CHAPTER_FUNCTIONS]
        exec(compile(ast.Module(body=defs, type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
        found += [node.name for node in defs]
    assert sorted(found) == sorted(CHAPTER_FUNCTIONS), "each of the book's functions is defined exactly once"
    return namespace


@pytest.fixture(scope="module")
def tiny_setup():
    text = ch05_utils.read_text_file(ch05_utils.the_verdict_path())[:1000]  # about 8 batches
    torch.manual_seed(0)
    model = GPTModel(TINY)
    loader = create_dataloader_v1(text, batch_size=2, max_length=16, stride=16, shuffle=False, drop_last=False)
    return model, loader, get_tokenizer()


def _defines_only(source: str) -> bool:
    """True for a cell that only defines functions (and imports): it needs no weights to run."""
    return all(isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom)) for node in ast.parse(source).body)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    """One parameters cell, one CI switch, kernel python3, no errors, weights cells without
    outputs, every other cell executed in order."""
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code_cells) == 1
    assert nb.metadata.get("ci_parameters") == {"SMOKE_TEST": True}, "one parameter switches to CI mode"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in code_cells:
        assert all(o.output_type != "error" for o in cell.outputs), cell.source[:80]
    weights_cells = [c for c in code_cells if WEIGHTS_TAG in c.metadata.get("tags", [])]
    assert weights_cells, f"the cells that need OpenAI's weights should be tagged {WEIGHTS_TAG!r}"
    for cell in weights_cells:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    for cell in code_cells:
        if any(name in cell.source for name in WEIGHTS_NAMES) and not _defines_only(cell.source):
            assert WEIGHTS_TAG in cell.metadata.get("tags", []), cell.source[:80]
    counts = [c.execution_count for c in code_cells if WEIGHTS_TAG not in c.metadata.get("tags", [])]
    assert None not in counts, "every untagged code cell ran"
    assert counts == sorted(counts), "the cells ran top to bottom"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_learner_text_has_no_test_machinery(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        assert "ci_parameters" not in cell.source
        assert "notebook_ci_helpers" not in cell.source or cell.source.lstrip().startswith("if SMOKE_TEST:")


def test_notebook_names_the_books_exercises(nb):
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for n in range(1, 7):
        assert f"Exercise 5.{n}" in text


def test_text_helpers_match(notebook_functions):
    tokenizer = get_tokenizer()
    text = "Every effort moves you<|endoftext|> forward."
    ids = notebook_functions["text_to_token_ids"](text, tokenizer)
    assert torch.equal(ids, previous_chapters.text_to_token_ids(text, tokenizer))
    decoded = notebook_functions["token_ids_to_text"](ids, tokenizer)
    assert decoded == text == previous_chapters.token_ids_to_text(ids, tokenizer)


def test_losses_match(notebook_functions, tiny_setup):
    model, loader, _ = tiny_setup
    model.eval()
    x, y = next(iter(loader))
    with torch.no_grad():
        assert torch.equal(notebook_functions["calc_loss_batch"](x, y, model, "cpu"),
                           previous_chapters.calc_loss_batch(x, y, model, "cpu"))
        for num_batches in (None, 2, 1000):
            assert notebook_functions["calc_loss_loader"](loader, model, "cpu", num_batches) == \
                previous_chapters.calc_loss_loader(loader, model, "cpu", num_batches)
    empty = create_dataloader_v1("too short", batch_size=2, max_length=16, stride=16, shuffle=False)
    assert math.isnan(notebook_functions["calc_loss_loader"](empty, model, "cpu"))
    assert notebook_functions["evaluate_model"](model, loader, loader, "cpu", 2) == \
        previous_chapters.evaluate_model(model, loader, loader, "cpu", 2)


@pytest.mark.parametrize("kwargs", [
    {},
    {"temperature": 1.5},
    {"temperature": 0.7, "top_k": 5},
    {"top_k": 1},
    {"temperature": 1.0, "top_k": 50, "eos_id": 13},
    {"temperature": 2.0, "eos_id": 11},
])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_matches(notebook_functions, tiny_setup, kwargs, batch):
    model, _, tokenizer = tiny_setup
    model.eval()
    idx = previous_chapters.text_to_token_ids("Every effort moves you", tokenizer).repeat(batch, 1)
    outs = [generate(model, idx, max_new_tokens=20, context_size=16,
                     generator=torch.Generator().manual_seed(1), **kwargs)
            for generate in (notebook_functions["generate"], previous_chapters.generate)]
    assert torch.equal(outs[0], outs[1])


def test_generate_stops_before_eos_as_the_book(notebook_functions, tiny_setup):
    """Batch of one: the loop ends at eos_id without appending it (the book's behaviour)."""
    model, _, tokenizer = tiny_setup
    model.eval()
    idx = previous_chapters.text_to_token_ids("Every effort moves you", tokenizer)
    greedy = notebook_functions["generate"](model, idx, max_new_tokens=5, context_size=16)
    eos = greedy[0, idx.shape[1] + 2].item()  # make the third new token the end token
    out = notebook_functions["generate"](model, idx, max_new_tokens=5, context_size=16, eos_id=eos)
    first = (greedy[0, idx.shape[1]:] == eos).nonzero()[0].item()
    assert torch.equal(out, greedy[:, :idx.shape[1] + first])


def test_generate_rejects_bad_arguments(notebook_functions, tiny_setup):
    model, _, _ = tiny_setup
    idx = torch.zeros(1, 1, dtype=torch.long)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            notebook_functions["generate"](model, idx, 1, 16, temperature=bad)
    with pytest.raises(ValueError, match="top_k"):
        notebook_functions["generate"](model, idx, 1, 16, top_k=0)


def test_print_sampled_tokens(notebook_functions, capsys):
    """1,000 seeded draws, one line per word (never-drawn words too), as a direct count gives."""
    probas = torch.tensor([0.5, 0.3, 0.2, 0.0])
    counts = notebook_functions["print_sampled_tokens"](probas)
    printed = capsys.readouterr().out.splitlines()

    torch.manual_seed(123)
    draws = collections.Counter(torch.multinomial(probas, num_samples=1).item() for _ in range(1_000))
    assert printed == [f"{draws[i]} x {word}" for i, word in TOY_WORDS.items()]
    assert counts.tolist() == [draws[i] for i in TOY_WORDS]
    assert sum(draws.values()) == 1_000 and draws[3] == 0
    for i, p in enumerate(probas.tolist()):  # within 5 standard deviations of the expectation
        assert abs(draws[i] - 1_000 * p) <= 5 * math.sqrt(1_000 * p * (1 - p)) + 1e-9


def test_training_loop_matches(notebook_functions, tiny_setup, capsys):
    """Same seed, same shuffled data order over two epochs, dropout on: the notebook's
    loop and the module's give identical losses."""
    text = ch05_utils.read_text_file(ch05_utils.the_verdict_path())[:1000]
    tokenizer = tiny_setup[2]
    results = []
    for train in (notebook_functions["train_model_simple"], previous_chapters.train_model_simple):
        torch.manual_seed(123)
        model = GPTModel(TINY)
        loader, _ = ch05_utils.create_train_val_loaders(text, TINY, batch_size=2, seed=123)  # shuffles
        optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
        results.append(train(model, loader, loader, optimizer, "cpu", num_epochs=2, eval_freq=3, eval_iter=1,
                             start_context="Every effort", tokenizer=tokenizer))
        results.append(capsys.readouterr().out)
    nb_losses, nb_out, module_losses, module_out = results
    assert nb_losses == module_losses
    assert nb_out == module_out  # the same evaluation lines and samples
    assert len(nb_losses[0]) == len(range(0, 2 * len(loader), 3))


def test_plot_losses_matches(notebook_functions):
    args = ([0, 1, 2], [0, 64, 128], [9.0, 7.0, 5.0], [9.5, 8.0, 7.5])
    figs = [notebook_functions["plot_losses"](*args), previous_chapters.plot_losses(*args)]
    for fig in figs:
        ax1, ax2 = fig.axes
        assert (ax1.get_xlabel(), ax2.get_xlabel()) == ("Epochs", "Tokens seen")
        assert [line.get_ydata().tolist() for line in ax1.lines] == [[9.0, 7.0, 5.0], [9.5, 8.0, 7.5]]
        assert ax2.lines[0].get_xdata().tolist() == [0, 64, 128]
    assert [ln.get_label() for ln in figs[0].axes[0].lines] == [ln.get_label() for ln in figs[1].axes[0].lines]


def test_assign_matches(notebook_functions):
    left = torch.nn.Linear(3, 2).weight
    right = np.arange(6, dtype=np.float32).reshape(2, 3)
    ours, module = notebook_functions["assign"](left, right), previous_chapters.assign(left, right)
    for param in (ours, module):
        assert isinstance(param, torch.nn.Parameter) and param.requires_grad
        assert param.dtype == torch.float32 and torch.equal(param.data, torch.from_numpy(right))
    right[0, 0] = 99.0  # a copy, not a view of the array
    assert ours[0, 0].item() == 0.0
    for assign in (notebook_functions["assign"], previous_chapters.assign):
        with pytest.raises(ValueError, match="Shape mismatch"):
            assign(left, right.T)


def _nested_params(variables: dict[str, np.ndarray], n_layer: int) -> dict:
    """OpenAI's flat checkpoint names (`model/h0/attn/c_attn/w`, ...) as the book's params dict."""
    params = {"blocks": [{} for _ in range(n_layer)]}
    for name, array in variables.items():
        parts = name.split("/")[1:]
        target = params["blocks"][int(parts[0][1:])] if parts[0].startswith("h") else params
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(array, axis=0) if parts[-1] == "w" and array.ndim == 3 else array
    return params


def test_load_weights_into_gpt_matches(notebook_functions):
    """On a tiny random GPT-2 in OpenAI's layout: the notebook's loader gives the module's
    model (every tensor, the separate output head) and transformers' logits."""
    from openai_checkpoint import TINY_HPARAMS, make_hf_model, openai_variables

    hf_model = make_hf_model(TINY_HPARAMS, seed=3)
    params = _nested_params(openai_variables(hf_model), TINY_HPARAMS["n_layer"])
    config = {"vocab_size": TINY_HPARAMS["n_vocab"], "context_length": TINY_HPARAMS["n_ctx"],
              "emb_dim": TINY_HPARAMS["n_embd"], "n_heads": TINY_HPARAMS["n_head"],
              "n_layers": TINY_HPARAMS["n_layer"], "drop_rate": 0.0, "qkv_bias": True}
    models = []
    for load in (notebook_functions["load_weights_into_gpt"], previous_chapters.load_weights_into_gpt):
        torch.manual_seed(0)
        model = GPTModel(config).eval()
        load(model, params)
        models.append(model)
    ours, module = models
    ours_sd, module_sd = ours.state_dict(), module.state_dict()
    assert ours_sd.keys() == module_sd.keys()
    for name in ours_sd:
        assert torch.equal(ours_sd[name], module_sd[name]), name
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in module.parameters())
    assert ours.out_head.weight is not ours.tok_emb.weight
    assert ours.out_head.weight.data_ptr() != ours.tok_emb.weight.data_ptr()
    assert torch.equal(ours.out_head.weight, ours.tok_emb.weight)

    idx = torch.randint(0, TINY_HPARAMS["n_vocab"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-4)


def test_load_weights_into_gpt_checks_shapes(notebook_functions):
    from openai_checkpoint import TINY_HPARAMS, make_hf_model, openai_variables

    params = _nested_params(openai_variables(make_hf_model(TINY_HPARAMS)), TINY_HPARAMS["n_layer"])
    wrong = {**GPT_CONFIG_124M, "context_length": TINY_HPARAMS["n_ctx"], "emb_dim": 32, "n_heads": 2,
             "n_layers": TINY_HPARAMS["n_layer"], "qkv_bias": True}
    with pytest.raises(ValueError, match="Shape mismatch"):
        notebook_functions["load_weights_into_gpt"](GPTModel(wrong), params)


def test_quoted_published_numbers_are_marked(nb):
    """Numbers that come from the course's published run, not from this notebook, say so."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and re.search(r"3\.7547|3\.5596|Every effort moves you toward", cell.source):
            assert "course's published" in cell.source, cell.source[:80]


def test_exercise_solutions_reuse_the_chapters_code():
    """Functions that exercise-solutions.ipynb repeats from ch05.ipynb are the same code."""
    def definitions(path):
        nb = nbformat.read(path, as_version=4)
        return {node.name: ast.dump(node) for cell in nb.cells if cell.cell_type == "code"
                for node in ast.parse(cell.source).body if isinstance(node, ast.FunctionDef)}

    chapter, exercises = definitions(NOTEBOOKS[0]), definitions(NOTEBOOKS[1])
    shared = set(chapter) & set(exercises)
    assert {"print_sampled_tokens", "softmax_with_temperature"} <= shared
    for name in shared:
        assert exercises[name] == chapter[name], f"{name} differs between the two notebooks"
