"""Duplicate scan: every window of 6 consecutive code lines (white space folded; blank, comment and
one-character lines skipped) of the .py files under a folder, hashed; prints each window found at more
than one place, with its lines.

    python benchmarks/experiments/code-checks/duplicate_windows.py veloxseg
"""

import hashlib
import re
import sys
from collections import defaultdict
from pathlib import Path

WINDOW = 6


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, folded text) of the lines of ``path`` that count."""
    lines = [(n, re.sub(r"\s+", " ", line.strip())) for n, line in enumerate(path.read_text().splitlines(), 1)]
    return [(n, text) for n, text in lines if len(text) > 1 and not text.startswith("#")]


def repeated_windows(root: Path) -> list[list[tuple[str, int, int, list[str]]]]:
    """Each window found at more than one place: its places as (file, first line, last line, lines)."""
    places = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        lines = code_lines(path)
        for i in range(len(lines) - WINDOW + 1):
            window = lines[i : i + WINDOW]
            texts = [text for _, text in window]
            places[hashlib.sha1("\n".join(texts).encode()).hexdigest()].append(
                (str(path), window[0][0], window[-1][0], texts)
            )
    return [where for where in places.values() if len(where) > 1]


if __name__ == "__main__":
    found = repeated_windows(Path(sys.argv[1]))
    for where in found:
        print(" ~ ".join(f"{path}:{first}-{last}" for path, first, last, _ in where))
        print("    " + " | ".join(where[0][3]))
    print(f"{len(found)} repeated windows of {WINDOW} lines")
