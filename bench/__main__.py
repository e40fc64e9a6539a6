"""``python -m bench``: list the benchmarks; run one with ``python -m bench.NAME``."""

import ast
from pathlib import Path

for path in sorted(Path(__file__).parent.glob("*.py")):
    if path.stem.startswith("_"):
        continue
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    print(f"python -m bench.{path.stem:<14} {doc.splitlines()[0] if doc else ''}")
