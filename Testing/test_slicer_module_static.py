"""Static checks of the Slicer module, whose GUI cannot run here (no Slicer application):
the .ui is valid XML, the widgets the code uses exist, parameter bindings match the parameter node,
PDIQSM.py compiles, and the CMake lists install every library file and resource."""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "PDIQSM" / "PDIQSM.py"
UI = ROOT / "PDIQSM" / "Resources" / "UI" / "PDIQSM.ui"
CMAKE = ROOT / "PDIQSM" / "CMakeLists.txt"


def ui_tree():
    return ET.parse(UI).getroot()


def parameter_fields() -> set[str]:
    tree = ast.parse(MODULE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PDIQSMParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_module_compiles():
    compile(MODULE.read_text(), str(MODULE), "exec")


def test_ui_is_valid_xml_with_a_root_widget():
    root = ui_tree()
    assert root.tag == "ui" and root.find("widget").get("class") == "qMRMLWidget"


def test_every_widget_the_code_uses_exists_in_the_ui():
    names = {w.get("name") for w in ui_tree().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used and used <= names, used - names


def test_parameter_names_match_the_parameter_node_both_ways():
    bound = {p.find("string").text for p in ui_tree().iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound == parameter_fields()


def test_choices_in_the_ui_match_the_module_maps():
    from PDIQSMLib.slicer_logic import PANEL_DEVICES, PANEL_EDGES, PANEL_METHODS, PANEL_UNITS, PANEL_VI_WHERE

    combos = {w.get("name"): [i.find("property/string").text for i in w.findall("item")]
              for w in ui_tree().iter("widget") if w.get("class") == "QComboBox"}
    assert combos["methodComboBox"] == list(PANEL_METHODS)
    assert combos["unitsComboBox"] == list(PANEL_UNITS)
    assert combos["deviceComboBox"] == list(PANEL_DEVICES)
    assert combos["edgesComboBox"] == list(PANEL_EDGES)
    assert combos["viWhereComboBox"] == list(PANEL_VI_WHERE)


def test_node_selectors_get_the_scene():
    root = ui_tree()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors and selectors == connected


def test_cmake_installs_every_library_file_and_resource():
    text = CMAKE.read_text()
    listed = set(re.findall(r"\.\./PDIQSMLib/(\w+\.py)", text))
    assert listed == {p.name for p in (ROOT / "PDIQSMLib").glob("*.py")}
    for rel in re.findall(r"^\s+(Resources/\S+|\.\./Resources/\S+)$", text, re.M):
        rel = rel.replace("${MODULE_NAME}", "PDIQSM")
        assert (ROOT / "PDIQSM" / rel).exists(), rel
    assert "slicer_add_python_unittest" in text and "slicerMacroBuildScriptedModule" in text


def test_extension_description_has_the_keywords():
    keys = {line.split(" ", 1)[0] for line in (ROOT / "PDIQSM.s4ext").read_text().splitlines() if line.strip()}
    assert {"scm", "scmurl", "depends", "build_subdirectory", "homepage", "contributors", "category", "iconurl",
            "screenshoturls", "status", "description", "enabled"} <= keys
    top = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(PDIQSM)" in top


def test_icon_is_128_square_png():
    data = (ROOT / "PDIQSM" / "Resources" / "Icons" / "PDIQSM.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 128 and int.from_bytes(data[20:24], "big") == 128


def test_the_automatic_lambda_tooltip_names_pdi_vi1s_default():
    """The panel's 'automatic' box gives PDI-VI1 the library's default TV weight; its tooltip says which."""
    from PDIQSMLib.defaults import VI_LAMBDA, VI_LAMBDA_PDI_EDGES

    box = next(w for w in ui_tree().iter("widget") if w.get("name") == "lambdaAutoCheckBox")
    tip = box.find("./property[@name='toolTip']/string").text
    assert f"PDI-VI1: {VI_LAMBDA_PDI_EDGES:g} " in tip and f"{VI_LAMBDA:g} with a magnitude" in tip
