"""Rewrite the operator config reference in docs/operators.md (between the
config-reference markers) from the config schema's Field descriptions.
Usage: PYTHONPATH=. python scripts/gen_config_reference.py"""

import re
from pathlib import Path

from splitserve.cluster.config import config_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "operators.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"

text = DOC.read_text()
m = re.search(re.escape(START) + "(.*?)" + re.escape(END), text, re.S)
if m is None:
    raise SystemExit(f"{DOC}: config-reference markers not found")
DOC.write_text(text[:m.start(1)] + config_reference() + text[m.end(1):])
print(f"updated {DOC}")
