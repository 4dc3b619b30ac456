"""Layout rules of cdul_ray/ (issue 10): modules <= 500 lines, functions <= 80 lines, no cross-module private imports.

Usage: python dev/check_layout.py   (exit status 1 and one line per violation when a rule is broken)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def violations(package: Path) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{path}: {n} lines > {MAX_MODULE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_FUNCTION_LINES:
                    out.append(f"{path}:{node.lineno}: function {node.name} has {span} lines > {MAX_FUNCTION_LINES}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cdul_ray"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        out.append(f"{path}:{node.lineno}: imports private {node.module}.{alias.name}")
    return out


if __name__ == "__main__":
    found = violations(Path(__file__).resolve().parents[1] / "cdul_ray")
    print("\n".join(found) or "layout ok")
    sys.exit(1 if found else 0)
