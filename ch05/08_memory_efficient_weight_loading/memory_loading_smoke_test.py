"""The smoke-test mode of memory-efficient-state-dict.ipynb.

The notebook's one switch, `SMOKE_TEST`, is turned on by the repository's notebook tests
(tests/test_notebooks.py, from the notebook's `ci_parameters`). It then calls
`smoke_test_settings` once, right after its settings, and runs every cell unchanged
with a tiny model of GPT-2's layout, writing its files into a scratch folder: seconds
instead of half an hour, and no 25 GB on disk. A learner never needs this module.
"""

import os
import tempfile
from pathlib import Path

SCRATCH_ENV = "CH05_NOTEBOOK_TMP"  # scratch folder the notebook tests provide
TINY_MODEL = {"emb_dim": 64, "n_layers": 2, "n_heads": 4, "context_length": 64}  # the benchmark's "tiny"


def smoke_test_settings(base_config: dict) -> tuple[str, dict, Path]:
    """(model name for the benchmark, the tiny model's config, a scratch folder for the files)."""
    folder = Path(os.environ.get(SCRATCH_ENV) or tempfile.mkdtemp(prefix="memory-loading-smoke-test-"))
    folder.mkdir(parents=True, exist_ok=True)
    return "tiny", {**base_config, **TINY_MODEL}, folder
