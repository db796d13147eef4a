"""Keep the copies of the shared GPT code identical to their canonical source.

Each numbered folder of ch05 must run on its own, so code that several folders use is
copied into each of them instead of imported from a shared package. The canonical
copy of each file lives in one folder (CANONICAL below); a file of the same name in
any other ch05 folder is a copy of it.

    python scripts/sync_shared_code.py                    # overwrite every copy with its source
    python scripts/sync_shared_code.py --check            # exit 1 if a copy differs
    python scripts/sync_shared_code.py --into ch05/06_user_interface previous_chapters.py
"""

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CH05 = ROOT / "ch05"
CANONICAL = {
    "previous_chapters.py": "01_main-chapter-code",
    "ch05_utils.py": "01_main-chapter-code",
    "gpt_download.py": "01_main-chapter-code",
    "tf_checkpoint_reader.py": "01_main-chapter-code",
    "gpt_kv_cache.py": "01_main-chapter-code",
    "lr_schedule.py": "04_learning_rate_schedulers",
}


def find_copies(name: str) -> list[Path]:
    """Every file called `name` in a ch05 folder other than its canonical home."""
    home = CANONICAL[name]
    return sorted(p for p in CH05.glob(f"*/{name}") if p.parent.name != home)


def drifted_copies() -> list[tuple[Path, Path]]:
    """(source, copy) pairs whose contents differ."""
    pairs = []
    for name, home in CANONICAL.items():
        source = CH05 / home / name
        for copy in find_copies(name):
            if not filecmp.cmp(source, copy, shallow=False):
                pairs.append((source, copy))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only report drifted copies (exit 1 if any).")
    parser.add_argument("--into", type=Path, metavar="FOLDER", help="Add new copies into this ch05 folder.")
    parser.add_argument("names", nargs="*", help=f"With --into: files to copy, from {sorted(CANONICAL)}.")
    args = parser.parse_args(argv)

    if args.into:
        for name in args.names:
            if name not in CANONICAL:
                parser.error(f"{name} is not a shared file; choose from {sorted(CANONICAL)}")
            shutil.copyfile(CH05 / CANONICAL[name] / name, args.into / name)
            print(f"copied {name} into {args.into}")
        return 0

    drifted = drifted_copies()
    if args.check:
        for source, copy in drifted:
            print(f"{copy.relative_to(ROOT)} differs from {source.relative_to(ROOT)}; run `make sync`.")
        return 1 if drifted else 0
    for source, copy in drifted:
        shutil.copyfile(source, copy)
        print(f"updated {copy.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
