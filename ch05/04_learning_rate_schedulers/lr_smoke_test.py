"""The smoke-test mode of learning_rate_schedulers.ipynb.

The notebook has one switch, `SMOKE_TEST`, in its `parameters` cell; the repository's
notebook tests turn it on. The notebook then calls `smoke_test_settings` once, right
after its settings, and runs every other cell unchanged in seconds instead of minutes:
a one-layer model with 16-dimensional embeddings trains for two epochs on the first
3,000 characters of The Verdict, and the figures go to a scratch folder instead of
over the ones committed beside the notebook. What it prints then means nothing.
A learner never needs this module.
"""

import os
import tempfile

SCRATCH_ENV = "CH05_NOTEBOOK_TMP"  # scratch folder the notebook tests provide
TINY_MODEL = {"context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1}
TEXT_CHARS = 3000
N_EPOCHS = 2
EVAL_FREQ = 4
EVAL_ITER = 1


def smoke_test_settings(model_config: dict) -> tuple[dict, int, int, int, int, str]:
    """(MODEL_CONFIG, TEXT_CHARS, N_EPOCHS, EVAL_FREQ, EVAL_ITER, FIGURE_DIR) for a run of seconds."""
    figure_dir = os.environ.get(SCRATCH_ENV) or tempfile.mkdtemp(prefix="lr-schedulers-smoke-test-")
    return {**model_config, **TINY_MODEL}, TEXT_CHARS, N_EPOCHS, EVAL_FREQ, EVAL_ITER, figure_dir
