"""Checks of the Slicer module that need no Slicer: the .ui matches the code, sizes, pins, and the Qt-free core."""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "FemurSeg" / "FemurSeg.py"
UI = REPO / "FemurSeg" / "Resources" / "UI" / "FemurSeg.ui"


def ui_object_names() -> set[str]:
    return {element.get("name") for element in ElementTree.parse(UI).iter("widget")}


def module_sources() -> list[Path]:
    """FemurSeg.py and the panel parts beside it (FemurSegWidgets/)."""
    return sorted((REPO / "FemurSeg").rglob("*.py"))


def test_every_ui_attribute_used_in_the_module_exists_in_the_ui_file():
    for source in module_sources():
        used = set(re.findall(r"self\.ui\.(\w+)", source.read_text()))
        assert used or source.name == "__init__.py", f"{source.name} uses no self.ui widgets?"
        assert used - ui_object_names() == set(), source.name


def test_parameter_names_in_the_ui_are_fields_of_the_parameter_node():
    source = MODULE.read_text()
    wrapper = source[source.index("class FemurSegParameterNode"):source.index("class FemurSegWidget")]
    fields = set(re.findall(r"^    (\w+):", wrapper, flags=re.MULTILINE))
    root = ElementTree.parse(UI).getroot()
    bound = {p.findtext("string") for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields


def test_ui_is_well_formed_with_the_module_class():
    root = ElementTree.parse(UI).getroot()
    assert root.tag == "ui" and root.findtext("class") == "FemurSeg"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared


def test_module_compiles(tmp_path):
    for source in module_sources():
        py_compile.compile(str(source), cfile=str(tmp_path / f"{source.stem}.pyc"), doraise=True)


def test_no_file_in_the_module_folder_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "FemurSeg").rglob("*")
            if p.is_file() and p.suffix in (".py", ".ui", ".txt") and (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def forbidden_uses(source: str) -> list[str]:
    """Imports of qt/ctk and uses of slicer.app/slicer.modules in code (docstrings may name them)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [name for name in names if name.split(".")[0] in ("qt", "ctk")
                  or name.startswith(("slicer.app", "slicer.modules"))]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer" \
                and node.attr in ("app", "modules"):
            found.append(f"slicer.{node.attr}")
    return found


def test_forbidden_uses_detector_catches_them():
    assert forbidden_uses("import qt\nfrom ctk import x\nimport slicer\nslicer.app.processEvents()") == \
        ["qt", "ctk", "slicer.app"]


def test_core_never_imports_qt_ctk_or_slicer_application():
    offenders = {p.name: uses for p in (REPO / "FemurSegLib").glob("*.py") if (uses := forbidden_uses(p.read_text()))}
    assert offenders == {}


def test_pinned_packages_match_requirements():
    requirements = dict(re.findall(r"^([A-Za-z0-9_\-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE))
    pins = re.search(r"PINNED_PACKAGES = \[(.*?)\]", MODULE.read_text()).group(1)
    for name, version in re.findall(r'"([A-Za-z0-9_\-]+)==([^"]+)"', pins):
        assert requirements.get(name) == version, name


def test_cmake_lists_the_module_resources_that_exist():
    cmake = (REPO / "FemurSeg" / "CMakeLists.txt").read_text()
    for resource in re.findall(r"^\s+(Resources/\S+|\$\{MODULE_NAME\}\S*\.py)$", cmake, flags=re.MULTILINE):
        assert (REPO / "FemurSeg" / resource.replace("${MODULE_NAME}", "FemurSeg")).is_file(), resource
    listed = set(re.findall(r"^\s+\$\{MODULE_NAME\}(\S*\.py)$", cmake, flags=re.MULTILINE))
    assert {f"{p.relative_to(REPO / 'FemurSeg')}".removeprefix("FemurSeg") for p in module_sources()} == listed
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
