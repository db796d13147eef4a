"""The copies of the shared GPT code stay identical to their canonical source."""

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sync_shared_code  # noqa: E402


def test_every_copy_matches_its_source():
    drifted = sync_shared_code.drifted_copies()
    assert drifted == [], f"copies out of sync (run `make sync`): {drifted}"


def test_check_mode_detects_a_drifted_copy(tmp_path, monkeypatch):
    home = tmp_path / "ch05" / "01_main-chapter-code"
    other = tmp_path / "ch05" / "03_other"
    home.mkdir(parents=True)
    other.mkdir()
    (home / "previous_chapters.py").write_text("x = 1\n")
    (other / "previous_chapters.py").write_text("x = 2\n")
    monkeypatch.setattr(sync_shared_code, "CH05", tmp_path / "ch05")
    monkeypatch.setattr(sync_shared_code, "ROOT", tmp_path)
    assert sync_shared_code.main(["--check"]) == 1
    assert sync_shared_code.main([]) == 0  # sync mode repairs the copy
    assert (other / "previous_chapters.py").read_text() == "x = 1\n"
    assert sync_shared_code.main(["--check"]) == 0


def test_module_names_are_unique_across_folders():
    """Tests put every folder on sys.path, so two different modules must not share a name."""
    homes = defaultdict(list)
    for path in (ROOT / "ch05").glob("[0-9][0-9]_*/*.py"):
        homes[path.name].append(path.parent.name)
    clashes = {name: dirs for name, dirs in homes.items()
               if len(dirs) > 1 and name not in sync_shared_code.CANONICAL}
    assert clashes == {}, f"module names used by several folders without being synced copies: {clashes}"


def test_check_command_runs_clean():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_shared_code.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_every_shared_file_names_its_canonical_copy():
    """A learner who opens a copy must see that `make sync` overwrites it, and where to edit."""
    for name, home in sync_shared_code.CANONICAL.items():
        text = (ROOT / "ch05" / home / name).read_text(encoding="utf-8")
        assert f"ch05/{home}/{name}" in text and "make sync" in text, name
