"""Every notebook in the repository runs top to bottom, at small scale.

Notebooks are discovered by themselves, so a new folder's notebook is covered the
moment it is committed. Each notebook has a cell tagged `parameters` (papermill's
convention) with the full-size settings a learner runs; the small settings for the
test live in the notebook's own metadata under `ci_parameters` (in string values,
`{tmp}` becomes a fresh temporary folder), and papermill injects them after the
parameters cell.
"""

import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "ch05").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_notebooks_are_discovered():
    assert NOTEBOOKS, "no notebooks found under ch05/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT / "ch05")) for p in NOTEBOOKS])
def test_notebook_has_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one code cell tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT / "ch05")) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, request):
    import papermill

    nb = nbformat.read(path, as_version=4)
    parameters = {
        name: value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value
        for name, value in nb.metadata.get("ci_parameters", {}).items()
    }
    env_before = dict(os.environ)
    os.environ["CH05_NOTEBOOK_TMP"] = str(tmp_path)  # scratch space a notebook may use
    if "gpt_download" in path.read_text() or "gpt_generate" in path.read_text():
        # Downloads of OpenAI's GPT-2 get a tiny random GPT-2 from a local server instead.
        os.environ["GPT2_BASE_URL"] = request.getfixturevalue("gpt2_test_server").base_url
    try:
        papermill.execute_notebook(
            str(path), str(tmp_path / path.name), parameters=parameters, kernel_name="python3",
            cwd=str(path.parent), progress_bar=False, request_save_on_cell_execute=False,
            execution_timeout=900,
        )
    finally:
        os.environ.clear()
        os.environ.update(env_before)
