"""A griffe extension for the API pages: the docstrings' reST roles and ``::`` blocks as Markdown.

The source's docstrings are written for reading in an editor and in ``help()``: they name other
objects with reST roles (``:class:`Store```, ``:func:`~adaptrep.sweep.expand```) and introduce code
with ``::``. Rendered as Markdown these would show literally, so this extension rewrites them when
mkdocstrings loads the package: a role becomes inline code (the last dotted part when the target
starts with ``~``), and a paragraph ending in ``::`` ends in ``:`` (the indented block after it is
already a Markdown code block). The source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|py:\w+):`(~?)([^`]+)`")
LITERAL = re.compile(r"(\S)::[ \t]*$", re.M)


def to_markdown(text: str) -> str:
    """``text`` with its reST roles as inline code and its ``::`` literal markers as ``:``."""

    def role(match: re.Match[str]) -> str:
        short, target = match.groups()
        return f"`{target.rsplit('.', 1)[-1] if short else target}`"

    return LITERAL.sub(r"\1:", ROLE.sub(role, text))


class ReSTRoles(griffe.Extension):
    """Rewrite every loaded docstring with :func:`to_markdown`."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
