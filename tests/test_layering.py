"""Import layering of the package: no two edm modules import each other, and the data side
(prompts, images, generation) does not depend on evaluation."""

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "edm"


def _imports() -> dict[str, set[str]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("edm", *path.relative_to(ROOT).with_suffix("").parts))
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edm"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("edm"))
        out[name] = deps
    return out


def test_no_two_modules_import_each_other():
    mods = _imports()
    assert len(mods) > 40
    pairs = [(a, b) for a, b in itertools.combinations(mods, 2) if b in mods[a] and a in mods[b]]
    assert pairs == []


def test_data_and_generation_do_not_import_evaluation():
    mods = _imports()
    bad = [(m, d) for m, deps in mods.items() if m.startswith(("edm.data", "edm.generate"))
           for d in deps if d.startswith("edm.eval")]
    assert bad == []
