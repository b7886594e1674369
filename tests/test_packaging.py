"""The distribution: its name is free on PyPI (``openseed`` there is another project), and the wheel carries every
module and the Hydra configs, so that an installed openseed trains and converts from any folder."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_config(tmp_path):
    source = tmp_path / "src"
    for name in ("openseed", "data_prep", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    assert wheel.name.startswith("openseed_platform-")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for d in ("openseed", "data_prep") for p in (ROOT / d).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)
    configs = {"openseed/" + str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assert len(configs) > 20 and configs <= names, sorted(configs - names)
    page = {str(p.relative_to(ROOT)) for p in (ROOT / "openseed" / "annotate" / "static").iterdir()}
    assert {"openseed/annotate/static/index.html", "openseed/annotate/static/app.js"} <= page <= names


def test_distribution_name_is_not_the_taken_one():
    text = (ROOT / "pyproject.toml").read_text()
    assert '\nname = "openseed-platform"' in text and '\nname = "openseed"\n' not in text
