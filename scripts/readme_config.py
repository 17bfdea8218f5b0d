"""Rewrite the README's config reference from the config's own descriptions
(``manifests.config.describe_options``) and its stage table from the plan
(``pipeline.plan.stage_table``): run after changing an option or a stage."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from manifests.config import describe_options  # noqa: E402

HEAD = "## Config reference\n"

readme = ROOT / "README.md"
text = readme.read_text()
start = text.index(HEAD) + len(HEAD)
rest = text[start:]
end = rest.find("\n## ")  # the next top-level section, if any
tail = rest[end:] if end >= 0 else "\n"
text = text[:start] + "\n" + describe_options().strip() + "\n" + tail

from pipeline.plan import stage_table  # noqa: E402

OPEN, CLOSE = "<!-- stage table: generated -->\n", "<!-- end stage table -->"
a, b = text.index(OPEN) + len(OPEN), text.index(CLOSE)
readme.write_text(text[:a] + stage_table() + "\n" + text[b:])
print("README config reference and stage table rewritten")
