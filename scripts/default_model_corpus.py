"""The training text of the default model pair: the Python standard library.

Everything comes from the interpreter that runs this script (PSF-licensed,
on every machine that has Python, no download):

- code: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, in
  sorted order, except the test suites, site-packages, codec tables
  (``encodings/``), build configuration, generated data modules and files
  over ``MAX_FILE_BYTES``; docstrings and comments make it half English;
- prose: the reference documentation that ``pydoc`` carries
  (``pydoc_data/topics.py``, one document per topic, as plain text), the
  licence text (``LICENSE.txt``) and IDLE's text files (``idlelib/*.txt``).

Each file (or pydoc topic) is one document. The held-out documents are the
ones whose SHA-256 of ``name`` sorts first, taken until ``HELDOUT_BYTES``
are reached; they never enter training and are shipped with the package as
``engine/default_model/heldout.txt`` (the perplexity reference). The same
interpreter version gives the same split on any machine; the record written
by ``scripts/train_default_model.py`` names the version and the digests.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 256 * 1024
HELDOUT_BYTES = 200 * 1024
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings",
             "__pycache__", "lib-dynload", "ensurepip"}
SKIP_PREFIXES = ("config-", "_sysconfigdata")
# generated tables: data, not code anyone wrote
SKIP_FILES = {"pydoc_data/topics.py", "stringprep.py", "idlelib/idle_test", "lib2to3/Grammar.txt"}
PROSE_FILES = ("LICENSE.txt",)
PROSE_GLOBS = ("idlelib/*.txt",)


@dataclass(frozen=True)
class Document:
    name: str  # path under the stdlib, or "pydoc_data/topics.py#<topic>"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _skipped(rel: Path) -> bool:
    return (any(p in SKIP_DIRS or p.startswith(SKIP_PREFIXES) for p in rel.parts)
            or rel.as_posix() in SKIP_FILES)


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    # mostly-non-ASCII files are data tables or foreign text, not English or code
    if not text.strip() or sum(c.isascii() for c in text) < 0.98 * len(text):
        return None
    return text


def pydoc_topics(root: Path) -> list[Document]:
    """The ``topics`` dict of pydoc_data/topics.py, read as a literal (never executed)."""
    tree = ast.parse((root / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            return [Document(f"pydoc_data/topics.py#{k}", topics[k]) for k in sorted(topics)]
    raise ValueError("pydoc_data/topics.py has no `topics` dict")


def collect(root: Path | None = None) -> list[Document]:
    """Every document, sorted by name."""
    root = root or stdlib_root()
    docs: list[Document] = []
    paths = sorted(p for p in root.rglob("*.py") if not _skipped(p.relative_to(root)))
    paths += [root / f for f in PROSE_FILES]
    paths += sorted(p for g in PROSE_GLOBS for p in root.glob(g) if not _skipped(p.relative_to(root)))
    for p in paths:
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        text = _read(p)
        if text is not None:
            docs.append(Document(p.relative_to(root).as_posix(), text))
    docs += pydoc_topics(root)
    return sorted(docs, key=lambda d: d.name)


def split(docs: list[Document], heldout_bytes: int = HELDOUT_BYTES) -> tuple[list[Document], list[Document]]:
    """(train, held-out): held-out takes documents in SHA-256-of-name order
    until ``heldout_bytes``; both keep name order."""
    order = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    held, size = set(), 0
    for d in order:
        if size >= heldout_bytes:
            break
        if len(d.text.encode()) > heldout_bytes // 4:  # no single file dominates the reference
            continue
        held.add(d.name)
        size += len(d.text.encode())
    return [d for d in docs if d.name not in held], [d for d in docs if d.name in held]


def join(docs: list[Document]) -> str:
    """Documents separated by a blank line (what the held-out file holds)."""
    return "\n\n".join(d.text.strip("\n") for d in docs) + "\n"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


if __name__ == "__main__":
    train, held = split(collect())
    for label, part in (("train", train), ("held-out", held)):
        text = join(part)
        print(f"{label}: {len(part)} documents, {len(text.encode())} bytes, sha256 {digest(text)[:16]}")
    print(f"python {sys.version.split()[0]} at {stdlib_root()}")
