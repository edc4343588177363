"""Generate the API reference pages of ``lregions_core`` at build time (mkdocs-gen-files).

One page per module, ``reference/<dotted.name>.md``, whose body is mkdocstrings' ``:::``
directive (the python handler reads the docstrings statically, without importing the module),
and ``reference/index.md``: every module with the first sentence of its docstring. A new module
gets its page without any edit here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lregions_core"


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            continue  # the packages' __init__ files are empty
        if any(part.startswith("_") for part in parts):
            continue
        found.append((".".join(parts), path))
    return found


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return first.replace("|", "\\|")


index = [
    "# API reference",
    "",
    ("The library, `lregions_core`, from its docstrings (generated when the site is built). It "
    "never imports Prefect, `flows` or `tasks`; the `lregions` command's batch, ablation and "
    "deployment commands live in `flows/` and are described in the user guide."),
    "",
    "| module | what it is |",
    "|---|---|",
]
for name, path in modules():
    page = f"reference/{name}.md"
    with mkdocs_gen_files.open(page, "w") as f:
        f.write(f"# `{name}`\n\n::: {name}\n")
    mkdocs_gen_files.set_edit_path(page, "../" + str(path.relative_to(ROOT)))
    index.append(f"| [`{name}`]({name}.md) | {summary(path)} |")

with mkdocs_gen_files.open("reference/index.md", "w") as f:
    f.write("\n".join(index) + "\n")
