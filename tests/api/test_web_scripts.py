"""The dashboard's scripts share one global scope: a function declared twice silently replaces the
first everywhere (the search page's meanStd once blanked every mean ± std chart)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

WEB = Path(__file__).resolve().parents[2] / "service" / "web"
DECLARATION = re.compile(r"^(?:async\s+)?function\s+([A-Za-z_$][\w$]*)", re.MULTILINE)


def test_no_global_function_is_declared_twice() -> None:
    names = Counter(
        name for script in sorted(WEB.glob("*.js")) for name in DECLARATION.findall(script.read_text())
    )
    assert len(names) > 50  # the scripts were found and read
    assert [name for name, count in names.items() if count > 1] == []
