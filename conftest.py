"""Test set-up shared by every folder.

Each ch05 folder is put on sys.path so tests can import its modules by name. This is
safe because a module name may appear in two folders only when it is a synced copy
of the same file (tests/test_shared_code.py checks both rules).

Offline data: if `../shared/data` exists beside the repository (CI and the course's
development machines), tests read the-verdict and tiktoken's BPE files from it unless
the environment already says otherwise.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"

for folder in sorted((ROOT / "ch05").glob("[0-9][0-9]_*")):
    sys.path.insert(0, str(folder))

if SHARED_DATA.is_dir():
    os.environ.setdefault("CH05_DATA_DIR", str(SHARED_DATA))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken-cache"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")
