"""Rewrite the README's config reference from the config's own descriptions
(``manifests.config.describe_options``): run after changing an option."""

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
readme.write_text(text[:start] + "\n" + describe_options().strip() + "\n" + tail)
print("README config reference rewritten")
