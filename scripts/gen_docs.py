#!/usr/bin/env python3
"""Write the generated documentation pages, or check that they are current.

    python scripts/gen_docs.py          # (re)write every generated page
    python scripts/gen_docs.py --check  # exit 1, naming the stale pages, when one differs from its source

Each page is rendered by a function of the package; add a page by adding one line to ``GENERATED``
(path relative to the repository root -> "module:function" returning the page's text).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

#: page (relative to the repository root) -> "module:function" that renders it
GENERATED: dict[str, str] = {
    "docs/config.md": "splade_obs.config_schema:render_config_docs",
    "docs/observability.md": "splade_obs.vocabulary:observability_page",   # the metric table between markers
}


def renderer(spec: str) -> Callable[[], str]:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def render(path: str) -> str:
    text = renderer(GENERATED[path])()
    return text if text.endswith("\n") else text + "\n"


def stale(root: Path = ROOT) -> list[str]:
    """The generated pages whose file differs from what their function renders now."""
    out = []
    for path in GENERATED:
        target = root / path
        if not target.is_file() or target.read_text(encoding="utf-8") != render(path):
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is stale")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for path in bad:
            print(f"{path} is stale: run python scripts/gen_docs.py", file=sys.stderr)
        return 1 if bad else 0
    for path in GENERATED:
        target = ROOT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        text = render(path)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
