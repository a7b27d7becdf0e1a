"""benchmarks/RESULTS_ONNX.md: each ONNX benchmark rewrites only its own marked section."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the text from ``begin`` to ``end`` (markers included in ``section``) or append it;
    the rest of the file is kept."""
    text = path.read_text() if path.exists() else "# ONNX / TensorRT results\n\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def publish(path: Path | None, lines: list[str], begin: str, end: str) -> None:
    """Print a rendered section (``lines``, markers included) and write it into ``path`` (None:
    print only)."""
    section = "\n".join(lines)
    print(section)
    if path is not None:
        write_section(path, section, begin, end)
        print(f"wrote {path}")
