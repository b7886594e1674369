"""The layout's rules (docs/architecture.md), read from the code's imports: the ground floor imports nothing above
it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _openseed_imports(path: Path) -> set[str]:
    """The openseed modules a file imports (absolute imports; the package has no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "openseed"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "openseed":
            names.add(node.module)
    return names


def test_the_ground_floor_imports_only_itself():
    files = sorted((ROOT / "openseed" / "core").glob("*.py"))
    assert {f.stem for f in files} >= {"batch", "boxes", "coco", "codecs", "conditions", "outputs", "predictions",
                                        "vocabulary"}
    upward = {f.name: sorted(m for m in _openseed_imports(f) if not m.startswith("openseed.core"))
              for f in files}
    assert not any(upward.values()), upward


def test_the_import_reader_sees_imports():
    """The reader above cannot pass by seeing nothing: on a file with known imports it finds them."""
    assert "openseed.core.batch" in _openseed_imports(ROOT / "openseed" / "data" / "transforms.py")
