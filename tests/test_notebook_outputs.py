"""Committed notebook outputs show the chapter, not the machine that ran it.

A reader sees a notebook's outputs as part of the text. An absolute path of the
machine that executed it (/work/..., /home/..., /root/..., /tmp/...), a Python
`Traceback` or a warning printed by some library would be noise at best and a leak at
worst, so none may be committed. Re-execute the notebook with the cause fixed (set the
environment or filter the warning in code); never edit outputs by hand.
"""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in ROOT.rglob("*.ipynb")
                   if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|home|root|tmp)/")
WARNING_LINE = re.compile(
    r"\b[A-Za-z]*Warning\b:"           # Python warnings: "...: UserWarning: ...", "Warning: ..."
    r"|^\s*WARNING\b"                  # logging and absl: "WARNING: ...", "WARNING:tensorflow:..."
    r"|^\s*[WE]\d{4} \d\d:\d\d:\d\d"   # glog/absl lines: "W0000 00:00:...", "E0000 ..."
)
TEXT_MIME_TYPES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")


def output_texts(cell) -> list[str]:
    """Every piece of text a code cell's outputs show (images are skipped)."""
    texts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            texts.append(output.get("text", ""))
        elif output.get("output_type") == "error":
            texts.append("\n".join([output.get("ename", ""), output.get("evalue", ""),
                                    *output.get("traceback", [])]))
        for mime in TEXT_MIME_TYPES:
            value = output.get("data", {}).get(mime)
            if value is not None:
                texts.append(value if isinstance(value, str) else str(value))
    return texts


def problems_in(nb) -> list[str]:
    """One line per offending output line: cell number, what is wrong, the line itself."""
    problems = []
    for number, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for cell_output in cell.get("outputs", []):
            if cell_output.get("output_type") == "error":
                problems.append(f"cell {number}: an error output ({cell_output.get('ename')})")
        for text in output_texts(cell):
            for line in text.splitlines():
                for what, found in (("absolute path", ABSOLUTE_PATH.search(line)),
                                    ("Traceback", "Traceback" in line),
                                    ("warning", WARNING_LINE.search(line))):
                    if found:
                        problems.append(f"cell {number}: {what}: {line.strip()[:160]}")
    return problems


def test_notebooks_are_found():
    assert any(p.name == "ch05.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(ROOT)) for p in NOTEBOOKS])
def test_committed_outputs_are_clean(path):
    problems = problems_in(nbformat.read(path, as_version=4))
    assert problems == [], f"{path.relative_to(ROOT)}: re-execute it without these:\n" + "\n".join(problems)


def _notebook_with_outputs(*outputs):
    cell = nbformat.v4.new_code_cell("x = 1", outputs=list(outputs))
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("/work/ in text is fine"), cell])


@pytest.mark.parametrize("output, what", [
    (nbformat.v4.new_output("stream", text="saved to /work/main/ch05/model.pth\n"), "absolute path"),
    (nbformat.v4.new_output("stream", name="stderr", text="cache in '/home/ann/.cache/x'\n"), "absolute path"),
    (nbformat.v4.new_output("execute_result", data={"text/plain": "PosixPath('/tmp/tmpab12/x')"}), "absolute path"),
    (nbformat.v4.new_output("stream", name="stderr",
                            text="x.py:21: TqdmWarning: IProgress not found.\n"), "warning"),
    (nbformat.v4.new_output("stream", name="stderr",
                            text="W0000 00:00:1796159029.509355   11275 port.cc:153] slow\n"), "warning"),
    (nbformat.v4.new_output("stream", name="stderr", text="WARNING:tensorflow:retracing\n"), "warning"),
    (nbformat.v4.new_output("stream", text="Traceback (most recent call last):\n"), "Traceback"),
    (nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=["..."]), "an error output"),
])
def test_the_check_finds_each_kind_of_problem(output, what):
    problems = problems_in(_notebook_with_outputs(output))
    assert any(what in p for p in problems), problems


def test_the_check_accepts_clean_outputs():
    clean = [
        nbformat.v4.new_output("stream", text="Training loss: 3.754\nsaved model.pth (652 MB)\n"),
        nbformat.v4.new_output("stream", text="see https://example.org/tmp/file and ~/work/notes\n"),
        nbformat.v4.new_output("execute_result", data={"text/plain": "tensor([1., 2.])",
                                                       "image/png": "iVBORw0KGgo="}),
    ]
    assert problems_in(_notebook_with_outputs(*clean)) == []
