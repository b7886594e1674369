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


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_one_command_line_convention():
    """Every command line of the package, the data tools and the experiment drivers takes key=value words
    (openseed.cli, or Hydra for train/evaluate): none parses flags with argparse."""
    files = [f for folder in ("openseed", "data_prep", "experiments") for f in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 60
    assert "argparse" in _top_level_imports(Path(ast.__file__))  # the reader finds an argparse import where one is
    flags = [str(f.relative_to(ROOT)) for f in files if "argparse" in _top_level_imports(f)]
    assert flags == []
