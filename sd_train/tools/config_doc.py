"""`sd-train config-doc`: write the config reference, docs/config.md, from the schema's field docstrings.

    sd-train config-doc                  # (re)write docs/config.md (run from the repository root)
    sd-train config-doc --out FILE       # write it elsewhere
    sd-train config-doc --check          # exit 1 if the file differs from what the schema gives

Every field of sd_train/config/schema.py is documented by a string literal right after it. Python
drops those strings at runtime (dataclasses keep no field docs), so they are read from the source
with `ast`; the runtime dataclasses are walked too, and a field missing from either side, or one
with no docstring, stops the tool with its name. Torch-free: it imports only the config package.
A test (tests/unit/test_docs.py) renders the reference and compares it with the committed file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sd_train.config import schema
from sd_train.config.schema import TrainConfig

DEFAULT_OUT = Path("docs/config.md")
COMMAND = "sd-train config-doc"
# How Python literals read in YAML, the form a user writes them in.
_YAML_WORDS = {"None": "null", "True": "true", "False": "false"}


@dataclass(frozen=True)
class FieldDoc:
    """One documented field as declared: its name, type and default as written, and its docstring."""

    name: str
    type: str
    default: str
    doc: str


@dataclass(frozen=True)
class ClassDoc:
    name: str
    doc: str
    fields: tuple[FieldDoc, ...]


class _Source:
    """The schema's source, split into lines once (ast.get_source_segment splits it on every call)."""

    def __init__(self, text: str):
        self.lines = text.splitlines(keepends=True)

    def segment(self, node: ast.expr) -> str:
        """The source text of `node`, as written."""
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            return self.lines[first].encode()[node.col_offset : node.end_col_offset].decode()
        parts = [self.lines[first].encode()[node.col_offset :].decode(), *self.lines[first + 1 : last]]
        return "".join(parts + [self.lines[last].encode()[: node.end_col_offset].decode()])


def _type_text(node: ast.expr, source: _Source) -> str:
    """`Literal["a", "b"]` -> `"a" | "b"`, `Optional[int]` -> `int | null`; anything else as written."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        inner = node.slice
        if node.value.id == "Literal":
            items = inner.elts if isinstance(inner, ast.Tuple) else [inner]
            return " | ".join(source.segment(item) for item in items)
        if node.value.id == "Optional":
            return f"{_type_text(inner, source)} | null"
    if isinstance(node, ast.Constant) and node.value is None:
        return "null"
    text = source.segment(node)
    return " | ".join(_YAML_WORDS.get(part.strip(), part.strip()) for part in text.split("|"))


def _default_text(node: ast.expr | None, source: _Source) -> str:
    """The default as the source writes it; `field(default_factory=...)` as the value it makes."""
    if node is None:
        return "required"
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return _default_text(kw.value, source)
            if kw.arg == "default_factory":
                factory = kw.value
                if isinstance(factory, ast.Lambda):
                    return _default_text(factory.body, source)
                if isinstance(factory, ast.Name) and factory.id in ("list", "dict"):
                    return "[]" if factory.id == "list" else "{}"
                return f"{source.segment(factory)}()"
    if isinstance(node, (ast.List, ast.Tuple, ast.Dict)):
        try:  # a flow list in YAML's (and JSON's) own form, on one line
            return json.dumps(ast.literal_eval(node))
        except ValueError:
            pass
    text = " ".join(source.segment(node).split())
    return _YAML_WORDS.get(text, text)


def parse_schema(path: Path) -> dict[str, ClassDoc]:
    """Every dataclass in the schema source: its docstring and its fields in declaration order, each
    with the string literal that follows it (empty when there is none)."""
    text = path.read_text()
    source = _Source(text)
    classes: dict[str, ClassDoc] = {}
    for node in ast.parse(text).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: list[FieldDoc] = []
        body = node.body
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = inspect.cleandoc(nxt.value.value)
            fields.append(
                FieldDoc(
                    name=stmt.target.id,
                    type=_type_text(stmt.annotation, source),
                    default=_default_text(stmt.value, source),
                    doc=doc,
                )
            )
        classes[node.name] = ClassDoc(node.name, inspect.cleandoc(ast.get_docstring(node) or ""), tuple(fields))
    return classes


@dataclass(frozen=True)
class Section:
    """A config section as the user addresses it (`data`, `ema.posthoc`; "" for the top level)."""

    prefix: str
    doc: str
    fields: tuple[FieldDoc, ...]


def sections(classes: dict[str, ClassDoc], root: type = TrainConfig) -> list[Section]:
    """The sections in the order TrainConfig declares them, the top level first. Checked against the
    runtime dataclasses, so the reference cannot silently miss a field; raises naming every field
    that has no docstring."""
    out: list[Section] = []
    missing: list[str] = []

    def walk(cls: type, prefix: str, doc: str) -> None:
        declared = {f.name: f for f in classes[cls.__name__].fields}
        runtime = [f.name for f in dataclasses.fields(cls)]
        if list(declared) != runtime:
            raise RuntimeError(f"{cls.__name__}: fields read from the source {list(declared)} != runtime {runtime}")
        nested = [f for f in declared.values() if dataclasses.is_dataclass(_runtime_type(cls, f.name))]
        leaves = tuple(f for f in declared.values() if f not in nested)
        missing.extend(f"{prefix}{f.name}" for f in leaves if not f.doc)
        out.append(Section(prefix.rstrip("."), doc, leaves))
        for f in nested:
            sub = _runtime_type(cls, f.name)
            walk(sub, f"{prefix}{f.name}.", classes[sub.__name__].doc or f.doc)

    walk(root, "", classes[root.__name__].doc)
    if missing:
        raise RuntimeError(
            "config fields without a docstring (write one right after the field in sd_train/config/schema.py): "
            + ", ".join(missing)
        )
    return out


def _runtime_type(cls: type, name: str) -> type | None:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory, type):
        return f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
    return None


def _anchor(prefix: str) -> str:
    """The anchor GitHub gives the section's heading (`## ema.posthoc` -> `#emaposthoc`)."""
    return prefix.replace(".", "") if prefix else "top-level"


def _paragraphs(doc: str) -> str:
    """Reflow a docstring: one line per paragraph, so the Markdown does not depend on the source's wrapping."""
    paras = [" ".join(p.split()) for p in doc.split("\n\n")]
    return "\n\n".join(p for p in paras if p)


def render(schema_path: Path | None = None) -> str:
    """The whole reference as Markdown."""
    path = Path(schema_path or schema.__file__)
    secs = sections(parse_schema(path))
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated by `{COMMAND}` from sd_train/config/schema.py: edit the field docstrings there, "
        "then regenerate. -->",
        "",
        "Every key of a run's config, section by section, with its type, its default and what it does, as",
        "documented where it is declared (`sd_train/config/schema.py`). A config is a YAML file of these",
        "keys (see `configs/demo.yaml`); on the command line `section.key=value` overrides it",
        "(`optim.lr=2e-4 ema.posthoc.sigma_rels=[0.05,0.1]`). Precedence: these defaults < the YAML file <",
        "the overrides. Unknown keys and wrong types are refused at startup, naming the key.",
        "",
        "Sections: " + ", ".join(f"[{s.prefix or 'top level'}](#{_anchor(s.prefix)})" for s in secs) + ".",
    ]
    for sec in secs:
        title = sec.prefix or "top level"
        lines += ["", f"## {title}", ""]
        if sec.doc:
            lines += [_paragraphs(sec.doc), ""]
        for f in sec.fields:
            key = f"{sec.prefix}.{f.name}" if sec.prefix else f.name
            lines.append(
                f"- **`{key}`** (`{f.type}`, default `{f.default}`): " + _paragraphs(f.doc).replace("\n\n", " ")
            )
    return "\n".join(lines) + "\n"


def main_config_doc(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description="write the config reference from the schema's docstrings")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from the schema, write nothing")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: run `{COMMAND}` from the repository root", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0
