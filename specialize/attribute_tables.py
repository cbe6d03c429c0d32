"""Attribute tables for zero-shot prompt features: plain text files users edit, one value per line.

A table is `<group>.txt` in the attributes folder (garment, colour, pattern, style, ...). `#` starts a comment;
a `# template: a photo of a {} {garment}` comment sets the text each value is scored with, where `{}` is the
value and `{group}` is that group's top-scoring value for the same image (so a colour is scored on its garment).
"""
from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

from configs.errors import UserError

DEFAULT_ATTRIBUTES_DIR = Path(__file__).resolve().parent / "attributes"
DEFAULT_TEMPLATE = "a photo of a {}"
_TEMPLATE_LINE = re.compile(r"^#\s*template:\s*(.+?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class AttributeTable:
    """One group's values and scoring template; `refs` are the groups its template names."""
    group: str
    values: tuple[str, ...]
    template: str
    refs: tuple[str, ...]

    def texts(self, context: dict[str, str]) -> list[str]:
        """The scoring text of every value, with `{group}` fields taken from context (group -> chosen value)."""
        return [self.template.format(value, **context) for value in self.values]


def parse_table(path: Path) -> AttributeTable:
    """Reads one table file; an empty table or a template without `{}` is a UserError naming the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"attribute table {path} cannot be read ({type(err).__name__}); "
                        "it must be a UTF-8 text file with one value per line") from None
    template, values = DEFAULT_TEMPLATE, []
    for line in lines:
        line = line.strip()
        match = _TEMPLATE_LINE.match(line)
        if match:
            template = match.group(1)
        elif line and not line.startswith("#"):
            values.append(" ".join(line.split()))
    group = path.stem
    if not values:
        raise UserError(f"attribute table {path} lists no values; put one value per line (# starts a comment)")
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if "" not in fields:
        raise UserError(f"attribute table {path}: the template '{template}' needs a {{}} where the value goes")
    refs = tuple(dict.fromkeys(name for name in fields if name))
    if group in refs:
        raise UserError(f"attribute table {path}: the template cannot name its own group {{{group}}}")
    return AttributeTable(group, tuple(dict.fromkeys(values)), template, refs)


def load_attribute_tables(folder: str | Path, type_group: str = "garment") -> list[AttributeTable]:
    """Every `*.txt` table in folder, ordered so that each template's referenced groups come first.

    type_group is the head noun of every prompt (the naive baseline is that value alone); it must exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"attribute folder {folder} does not exist; give a folder of <group>.txt tables "
                        f"(the shipped ones are in {DEFAULT_ATTRIBUTES_DIR})")
    tables = {path.stem: parse_table(path) for path in sorted(folder.glob("*.txt"))}
    if type_group not in tables:
        raise UserError(f"attribute folder {folder} has no {type_group}.txt; the garment-type table is required "
                        f"(it gives the naive type-only prompt)")
    ordered: list[AttributeTable] = []
    pending = dict(tables)
    while pending:  # topological order over template references
        ready = [t for t in pending.values() if all(r in {o.group for o in ordered} for r in t.refs)]
        if not ready:
            bad = next(iter(pending.values()))
            unknown = [r for r in bad.refs if r not in tables]
            detail = f"names unknown group {{{unknown[0]}}}" if unknown else "references form a cycle"
            raise UserError(f"attribute table {folder / (bad.group + '.txt')}: its template {detail}")
        for table in ready:
            ordered.append(pending.pop(table.group))
    return ordered


def tables_hash(tables: list[AttributeTable]) -> str:
    """A short content hash of the tables (values and templates): the text-embedding disk cache key."""
    digest = hashlib.sha256()
    for table in sorted(tables, key=lambda t: t.group):
        digest.update(f"{table.group}\0{table.template}\0{chr(1).join(table.values)}\n".encode())
    return digest.hexdigest()[:16]
