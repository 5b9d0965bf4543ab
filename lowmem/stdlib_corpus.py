"""The Python standard library as a pretraining corpus and a fine-tuning task, split by module.

Every machine with Python has its standard library's source; these builders turn it into:

* a **text corpus** (one row per module: its source), for pretraining a small base model;
* a **supervised task** the base model has not been trained on: a function's code (signature and body, the docstring
  removed) → the first paragraph of its docstring, as alpaca rows (``instruction``, ``input``, ``output``), extracted
  with :mod:`ast`.

Modules (``.py`` files under the stdlib folder, tests, ``idlelib`` tests and ``site-packages`` left out) are split by
a hash of their relative path, so the split is the same on every machine with the same Python version:

    test   (10% of modules): the task's reported split, and the corpus's held-out split (forgetting)
    val    (10%):            the task's validation split (learning rates are chosen on it)
    train  (the rest):       the pretraining corpus and the task's training split

No module is in two splits, and neither held-out split is in the pretraining corpus.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
from pathlib import Path

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
INSTRUCTION = "Write the summary line of this Python function's docstring."
MAX_CODE_CHARS = 600  # with the answer and the template, a row stays under 256 tokens of the stdlib tokenizer
SUMMARY_CHARS = (20, 200)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative path, file)`` of each stdlib module, sorted by relative path."""
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if not SKIPPED_DIRS.intersection(relative.parts[:-1]):
            files.append((relative.as_posix(), path))
    return sorted(files)


def split_of(relative: str) -> str:
    """``train``, ``val`` or ``test`` from a stable hash of the module's relative path."""
    bucket = int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 20
    return "test" if bucket < 2 else "val" if bucket < 4 else "train"


def docstring_pairs(source: str) -> list[tuple[str, str]]:
    """``(code without its docstring, docstring summary)`` of each documented function with a body of its own."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        if not doc or not isinstance(first, ast.Expr):
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        if not SUMMARY_CHARS[0] <= len(summary) <= SUMMARY_CHARS[1]:
            continue
        start = (node.decorator_list[0] if node.decorator_list else node).lineno - 1
        kept = lines[start:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        if len(code) <= MAX_CODE_CHARS and code.count("\n") >= 1:
            pairs.append((code, summary))
    return pairs


def build(root: Path | None = None) -> dict[str, list[dict]]:
    """The rows of each split: ``corpus`` (text of the train modules), ``corpus-heldout`` (text of the test modules),
    ``docstrings``, ``docstrings-val``, ``docstrings-test`` (alpaca rows, a function's code only once)."""
    out: dict[str, list[dict]] = {name: [] for name in ("corpus", "corpus-heldout", "docstrings", "docstrings-val",
                                                       "docstrings-test")}
    seen: set[str] = set()
    for relative, path in module_files(root):
        source = path.read_text(encoding="utf-8", errors="replace")
        split = split_of(relative)
        if split == "train":
            out["corpus"].append({"text": source, "module": relative})
        elif split == "test":
            out["corpus-heldout"].append({"text": source, "module": relative})
        task = {"train": "docstrings", "val": "docstrings-val", "test": "docstrings-test"}[split]
        for code, summary in docstring_pairs(source):
            if code not in seen:
                seen.add(code)
                out[task].append({"instruction": INSTRUCTION, "input": code, "output": summary, "module": relative})
    return out
