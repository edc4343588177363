"""MkDocs hook: Sphinx roles in the library's docstrings (``:func:`name```) rendered as code.

The docstrings use reST roles (``:mod:``, ``:func:``, ``:class:``, ...), which mkdocstrings
prints verbatim; this drops the role and, for ``~module.name``, shows only ``name``, as Sphinx
would.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_code, html)
