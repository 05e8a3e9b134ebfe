#!/usr/bin/env python
"""Regenerate docs/configuration.md from the config dataclasses (their field comments are the documentation).

    python tools/gen_config_docs.py            # rewrite docs/configuration.md
    python tools/gen_config_docs.py --check    # exit 1 if the file is out of date (used by the tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
_FIELD = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+(?:=\s*(.*?))?\s*(?:#\s*(.*))?$")

HEADER = """# Configuration reference

Generated from the config dataclasses by `python tools/gen_config_docs.py` (a test fails when it is stale).
A run is configured by a YAML file (`tropd train --config FILE`) whose sections are below; any key can be overridden
on the command line as `section.key=value` (e.g. `train.steps=20 objective.outlier=clip`). Unknown keys, wrong types
and invalid values stop the run with an error naming the key.
"""


def _comments(cls) -> dict[str, str]:
    """Field name -> trailing comment in the class source (base classes first, so a subclass can re-document)."""
    out = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines():
            m = _FIELD.match(line)
            if m and m.group(3):
                out[m.group(1)] = m.group(3).strip()
    return out


def render() -> str:
    sys.path.insert(0, str(ROOT))
    from megatron_tropd.config import Config
    from megatron_tropd.config.schema import section_types

    defaults = Config()
    parts = [HEADER]
    for name, (cls, is_list) in section_types().items():
        obj = cls() if is_list else getattr(defaults, name)
        key = f"{name}[]" if is_list else name
        doc = (inspect.getdoc(cls) or "").split("\n")[0]
        parts.append(f"\n## `{key}` ({cls.__module__}.{cls.__name__}{', a list' if is_list else ''})\n")
        if doc and not doc.startswith(cls.__name__ + "("):
            parts.append(f"{doc}\n")
        if is_list:
            parts.append(f"A list (default `{getattr(defaults, name)!r}`); each entry has the keys below "
                         f"(override one with `{name}.0.key=value`).\n")
        parts.append("\n| key | default | meaning |\n|---|---|---|")
        comments = _comments(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            parts.append(f"| `{key}.{f.name}` | `{value!r}` | {comments.get(f.name, '').replace('|', '/')} |")
    return "\n".join(parts) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if docs/configuration.md is out of date")
    args = p.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
