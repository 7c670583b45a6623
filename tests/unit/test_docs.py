"""The documentation stays true to the repository: the config reference is what the schema's
docstrings give, every repository path, module and link that the docs name exists, the README's
index links every page under docs/, and the config example a newcomer copies from the README is
valid.

Checked texts: README.md, every Markdown file under docs/, and the module docstrings of train.py
and every Python file under sd_train/, tests/, bench/ and scripts/. In them:
- a path under one of the repository's folders (`sd_train/trainer.py`, `configs/demo.yaml`,
  `tests/e2e/`, ...) must exist: each file of a `{a,b}` list, and at least one for a glob or a
  numeric range (`tests/assets/tiny-{000000..000005}.tar`);
- a dotted module (`sd_train.data.prefetch`, `sd_train.host_sync.read_floats`) must be a module,
  or a name defined at the top of one (or a method of such a class);
- a relative Markdown link must reach a file, and its `#anchor` a heading of that file.
Example and output paths (`runs/x`, `data/emoji/...`, `models/tiny-sd`, `/scratch/...`) are not
under a repository folder, so they are not checked; nor is a path with a placeholder in it
(`<output_dir>`, `step_XXXXXXXX`, `...`), which names a pattern, not a file.
"""

from __future__ import annotations

import ast
import glob
import re
from pathlib import Path

import pytest

from sd_train.config import load_config
from sd_train.ema.plan import plan_from_config
from sd_train.tools import config_doc

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "sd_train").is_dir())
REPO_DIRS = ("sd_train", "configs", "tests", "bench", "launch", "scripts", "docs")
DOCSTRING_DIRS = ("sd_train", "tests", "bench", "scripts")

# A path starts at a repository folder, not inside another path or word, and runs over name
# characters, slashes, globs and {a,b} / {000..007} groups.
_PATH = re.compile(r"(?<![\w./~$-])((?:" + "|".join(REPO_DIRS) + r")/(?:[\w.*-]|\{[^}\s]*\}|/)*)")
_MODULE = re.compile(r"(?<![\w./-])(sd_train(?:\.[A-Za-z_]\w*)+)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_PLACEHOLDER = re.compile(r"<|>|XXXX|\.\.\.")


def texts() -> dict[Path, str]:
    """Every checked text, by the file it comes from."""
    out = {ROOT / "README.md": (ROOT / "README.md").read_text()}
    out.update({p: p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))})
    sources = [ROOT / "train.py", *(p for d in DOCSTRING_DIRS for p in sorted((ROOT / d).rglob("*.py")))]
    for p in sources:
        doc = ast.get_docstring(ast.parse(p.read_text()))
        if doc:
            out[p] = doc
    return out


def _alternatives(path: str) -> list[str]:
    """`configs/{demo,test}.yaml` -> each file it lists (every one must exist); a numeric range
    (`tiny-{000000..000005}.tar`, shell and webdataset form) becomes a glob over its digits."""
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    head, body, tail = path[: m.start()], m.group(1), path[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = ["[0-9]" * len(rng.group(1))] if rng else body.split(",")
    return [x for opt in options for x in _alternatives(head + opt + tail)]


def missing_paths(path: str) -> list[str]:
    """The files `path` names that are not there; a glob must match at least one file."""
    out = []
    for alt in _alternatives(path):
        found = glob.glob(str(ROOT / alt)) if any(c in alt for c in "*?[") else (ROOT / alt).exists()
        if not found:
            out.append(alt)
    return out


def _top_level_names(path: Path) -> dict[str, set[str]]:
    """Names defined at the top of a module -> for classes, the names defined in their body."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            members = set()
            for n in node.body:
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(n.name)
                elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                    members.add(n.target.id)
                elif isinstance(n, ast.Assign):
                    members.update(t.id for t in n.targets if isinstance(t, ast.Name))
            names[node.name] = members
        elif isinstance(node, ast.Assign):
            names.update({t.id: set() for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: set() for a in node.names})
    return names


def module_exists(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not file.is_file():
            continue
        rest = parts[i:]
        if not rest:
            return True
        if base.is_dir() and (base / rest[0]).with_suffix(".py").exists():
            return False  # a submodule would have matched above
        names = _top_level_names(file)
        return len(rest) <= 2 and rest[0] in names and (len(rest) == 1 or rest[1] in names[rest[0]])
    return False


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(md: str) -> set[str]:
    prose = _FENCE.sub("", md)
    found = {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", prose, re.M)}
    return found | set(re.findall(r'<a (?:id|name)="([^"]+)"', prose))


def broken_references(source: Path, text: str) -> list[str]:
    """What `text` (from `source`) names that the repository does not have, one line each."""
    bad = []
    for m in _PATH.finditer(text):
        path = m.group(1).rstrip(".,:;")
        if not _PLACEHOLDER.search(path):
            bad.extend(f"path {p}" for p in missing_paths(path))
    for m in _MODULE.finditer(text):
        if not module_exists(m.group(1)):
            bad.append(f"module {m.group(1)}")
    if source.suffix == ".md":
        for m in _LINK.finditer(_FENCE.sub("", text)):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (source.parent / file_part).resolve() if file_part else source
            if not dest.exists():
                bad.append(f"link {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                bad.append(f"link {target} (no heading with that anchor in {dest.relative_to(ROOT)})")
    return bad


def test_docs_name_only_what_exists():
    found = [f"{src.relative_to(ROOT)}: {ref}" for src, text in texts().items() for ref in broken_references(src, text)]
    assert not found, "the docs name what the repository does not have:\n" + "\n".join(found)


def test_readme_indexes_every_docs_page():
    """The README is the front door: each page under docs/ is linked from it (drafts waiting in
    docs/_incoming/ to be folded into a page are not pages yet)."""
    linked = {(ROOT / m.group(1).partition("#")[0]).resolve() for m in _LINK.finditer((ROOT / "README.md").read_text())}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "no docs pages found"
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked]
    assert not missing, f"pages not in the README's documentation index: {missing}"


@pytest.mark.parametrize("world_size", [1, 8, 32])
def test_readme_config_example_loads_and_passes_its_checks(tmp_path, world_size):
    """The config a newcomer copies from the README loads (no unknown key, no wrong type), passes
    every value check at the world sizes its commands launch, and has an EMA window the startup
    check accepts. (The shards and model folder are the reader's own: preflight is not run.)"""
    block = re.search(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no yaml config example"
    path = tmp_path / "my_run.yaml"
    path.write_text(block.group(1))
    cfg = load_config(str(path))
    cfg.validate(world_size)
    plan_from_config(cfg.ema, cfg.max_steps).check()


def test_the_reference_check_sees_a_broken_one():
    """The checker itself: a stale path, module, link or anchor is reported; a real one and a
    placeholder are not."""
    readme = ROOT / "README.md"
    text = (
        "See `sd_train/trainer.py`, `sd_train/no_such.py`, tests/e2e/test_deepspeed_posthoc.py and "
        "`configs/demo.yaml`. `sd_train.host_sync.read_floats`, `sd_train.ema_gone`, "
        "`sd_train.host_sync.no_such_name`. `<output_dir>/checkpoints/step_XXXXXXXX/`, runs/x, "
        "tests/assets/tiny-{000000..000005}.tar, configs/{demo,nope}.yaml, bench/*.py, bench/*.txt. "
        "[ok](docs/config.md), [gone](docs/nope.md), [anchor](README.md#no-such-heading)."
    )
    assert broken_references(readme, text) == [
        "path sd_train/no_such.py",
        "path tests/e2e/test_deepspeed_posthoc.py",
        "path configs/nope.yaml",
        "path bench/*.txt",
        "path docs/nope.md",
        "module sd_train.ema_gone",
        "module sd_train.host_sync.no_such_name",
        "link docs/nope.md",
        "link README.md#no-such-heading (no heading with that anchor in README.md)",
    ]


def test_config_reference_is_current():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_doc.render(), (
        f"docs/config.md is stale: run `{config_doc.COMMAND}` from the repository root and commit the result"
    )


def test_config_reference_refuses_an_undocumented_field(tmp_path):
    """A field whose docstring is deleted stops the generator, naming the field."""
    source = Path(config_doc.schema.__file__).read_text()
    optim = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "OptimArgs")
    i = next(i for i, n in enumerate(optim.body) if isinstance(n, ast.AnnAssign) and n.target.id == "lr")
    doc = optim.body[i + 1]
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    lines = source.splitlines(keepends=True)
    del lines[doc.lineno - 1 : doc.end_lineno]
    schema = tmp_path / "schema.py"
    schema.write_text("".join(lines))
    with pytest.raises(RuntimeError, match=r"optim\.lr\b"):
        config_doc.render(schema)
