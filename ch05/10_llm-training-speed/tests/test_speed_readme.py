"""The README's table of where each flag changes the code points at lines that still do that."""

import re
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent
# What the cited lines must mention for each flag.
KEYS = {"--mask-on-the-fly": "mask", "--sdpa": "sdpa", "--native-ops": "native_ops", "--pad-vocab": "pad_vocab",
        "--fused-adamw": "fused", "--no-decay-bias-norm": "no_decay_bias_norm", "--tf32": "tf32",
        "--pin-memory": "pin_memory", "--bf16": "bf16", "--pure-bf16": "pure_bf16", "--compile": "compile",
        "--grad-accum-steps": "accum", "--keep-grad-buffers": "keep_grad_buffers"}


def cited_lines() -> dict[str, list[tuple[int, int]]]:
    readme = (FOLDER / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Where each flag changes the chapter's code", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        flag = re.match(r"\| `(--[a-z0-9-]+)` \|", line)
        if flag:
            rows[flag.group(1)] = [(int(a), int(b or a)) for a, b in re.findall(r"L(\d+)(?:-L(\d+))?", line)]
    return rows


def test_every_flag_has_a_row_and_its_lines_mention_it():
    rows = cited_lines()
    assert set(rows) == set(KEYS)
    code = (FOLDER / "speed_train.py").read_text(encoding="utf-8").splitlines()
    for flag, ranges in rows.items():
        assert ranges, f"{flag}: no line numbers in the README"
        for first, last in ranges:
            cited = "\n".join(code[first - 1:last])
            assert KEYS[flag] in cited, f"README cites speed_train.py L{first}-L{last} for {flag}:\n{cited}"
