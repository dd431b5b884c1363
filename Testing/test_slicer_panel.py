"""The Slicer panel as Slicer runs it, checked without a Slicer application (issue 16).

No Slicer runs here, so Slicer's rules are written down and checked: the parameter node's field types
against the GUI connectors of Slicer 5.8-5.12 (table below), the module's import without the
reconstruction's packages, PythonQt's QByteArray, the process's exit status, the panel's defaults
against the command line's, and the widget's connect/disconnect behaviour with stand-ins for the Qt
layer (Slicer 5.8's connectGui returns None).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from PDIQSMLib import defaults
from PDIQSMLib.cli import build_parser, reconstruct_settings
from PDIQSMLib.slicer_logic import (PANEL_DEVICES, PANEL_EDGES, PANEL_METHODS, PANEL_UNITS, PANEL_VI_WHERE, Job,
                                    Request, decode_output, edge_args, label_of, noisy_region_args, process_outcome,
                                    request_from_panel, vi_sampling_args, vi_where_args)

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "PDIQSM" / "PDIQSM.py"
UI = ROOT / "PDIQSM" / "Resources" / "UI" / "PDIQSM.ui"

# Widget class -> the parameter types Slicer's connector for it accepts, from our reading of
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (Slicer 5.8 to 5.12; every connector matches
# the widget's exact type). 'bounded': a float/int connector that needs WithinRange (ctkSliderWidget and
# QSlider raise without it; QDoubleSpinBox and QSpinBox fall back to +-inf / +-2^31, issue 16 point 9).
CONNECTORS = {
    "QCheckBox": {"bool"},
    "QPushButton": {"bool"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QDoubleSpinBox": {"float"},
    "ctkSliderWidget": {"float"},
    "QComboBox": {"str", "int", "float", "bool"},  # with a Choice annotation (or an Enum)
    "QLineEdit": {"str"},
    "QTextEdit": {"str"},
    "ctkPathLineEdit": {"pathlib.Path"},  # pathlib types only: a str raises in connectGui
    "ctkDirectoryButton": {"pathlib.Path"},
    "qMRMLNodeComboBox": {"node"},
}
NEEDS_CHOICE = {"QComboBox"}
NUMERIC_NEEDS_RANGE = {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget"}


def parameter_annotations() -> dict[str, tuple[str, set[str]]]:
    """Field -> (base type as a name, annotation names), read from PDIQSM.py's source."""
    tree = ast.parse(MODULE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PDIQSMParameterNode")
    out = {}
    for n in (b for b in cls.body if isinstance(b, ast.AnnAssign)):
        ann = n.annotation
        extras: set[str] = set()
        if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
            elts = ann.slice.elts
            ann, extras = elts[0], {getattr(e.func, "id", "") for e in elts[1:] if isinstance(e, ast.Call)}
        name = ast.unparse(ann)
        nodes = name.startswith("vtkMRML") or (name.startswith(("Union[", "Optional[")) and all(
            part.strip().startswith("vtkMRML") for part in name.split("[", 1)[1].rstrip("]").split(",")))
        out[n.target.id] = ("node" if nodes else name, extras)  # a node, or a Union of nodes: the combobox connector
    return out


def ui_bindings() -> dict[str, str]:
    """Parameter name -> widget class in the .ui."""
    out = {}
    for w in ET.parse(UI).getroot().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                out[p.find("string").text] = w.get("class")
    return out


def test_every_parameter_type_is_one_its_widgets_connector_accepts():
    fields, bindings = parameter_annotations(), ui_bindings()
    assert set(fields) == set(bindings)
    for name, widget in bindings.items():
        base, extras = fields[name]
        assert widget in CONNECTORS, f"{name}: no Slicer connector for {widget}"
        assert base in CONNECTORS[widget], f"{name}: {widget} takes {CONNECTORS[widget]}, the parameter is {base}"
        if widget in NEEDS_CHOICE:
            assert "Choice" in extras, f"{name}: a QComboBox needs a Choice annotation"
        if widget in NUMERIC_NEEDS_RANGE:
            assert "WithinRange" in extras, f"{name}: unbounded {widget} (Slicer sets it to +-inf)"


def test_b0_boxes_start_disabled_while_b0_comes_from_geometry():
    root = ET.parse(UI).getroot()
    for name in ("b0XSpinBox", "b0YSpinBox", "b0ZSpinBox", "lambdaSpinBox"):
        w = next(w for w in root.iter("widget") if w.get("name") == name)
        enabled = [p for p in w.findall("property") if p.get("name") == "enabled"]
        assert enabled and enabled[0].find("bool").text == "false", name


def test_sample_data_uses_the_current_load_file_types_argument():
    text = MODULE.read_text()
    assert "loadFileTypes=" in text and "loadFileType=" not in text


def test_the_logic_imports_without_the_reconstructions_packages():
    """Slicer ships numpy, not nibabel, torch, scipy or safetensors: the module's logic must import and
    say what to install, not raise ImportError (issue 16 point 2)."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('nibabel', 'torch', 'scipy', 'safetensors', 'matplotlib'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] in "
        "('nibabel', 'torch', 'scipy', 'safetensors', 'matplotlib') else object()\n"
        "from PDIQSMLib import slicer_logic\n"
        "print(','.join(slicer_logic.missing_packages()), slicer_logic.torch_available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    missing, torch_ok = out.split()
    assert set(missing.split(",")) == {"nibabel>=5.0", "scipy>=1.10", "safetensors>=0.4", "matplotlib>=3.7"}
    assert torch_ok == "False"


class FakeQByteArray:
    """Shaped like PythonQt's QByteArray: ``.data()`` gives bytes; ``bytes(...)`` does not work on it."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def data(self) -> bytes:
        return self._raw

    def __bytes__(self):
        raise TypeError("PythonQt QByteArray cannot be converted by bytes()")

    def __iter__(self):
        raise TypeError("not iterable")


def test_process_output_is_decoded_from_pythonqt_bytearrays():
    assert decode_output(FakeQByteArray(b"PROGRESS 1/3 medi\nSTATUS ok\n")) == "PROGRESS 1/3 medi\nSTATUS ok\n"
    assert decode_output(b"caf\xc3\xa9") == "caf\u00e9" and decode_output("x") == "x"
    assert decode_output(FakeQByteArray(b"\xff")) == "\ufffd"  # undecodable bytes do not raise


def test_a_crashed_or_killed_process_is_never_a_success():
    assert process_outcome(0, False, "PROGRESS 3/3") is None
    assert "crashed or was killed" in process_outcome(0, True, "")  # Qt may report code 0 with CrashExit
    assert "crashed or was killed" in process_outcome(9, True, "PROGRESS 1/3 pdi")
    failed = process_outcome(2, False, "PROGRESS 1/3\npdiqsm reconstruct: error: mask.nii.gz: the mask is empty\n")
    assert failed == "pdiqsm reconstruct: error: mask.nii.gz: the mask is empty"
    assert process_outcome(1, False, "") == "pdiqsm exited with code 1"


class Panel:
    """The parameter node's values at their declared defaults (read from PDIQSM.py's source)."""

    def __init__(self, **changes) -> None:
        tree = ast.parse(MODULE.read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PDIQSMParameterNode")
        env = {"label_of": label_of, "PANEL_UNITS": PANEL_UNITS, "PANEL_METHODS": PANEL_METHODS,
               "PANEL_DEVICES": PANEL_DEVICES, "PANEL_EDGES": PANEL_EDGES, "PANEL_VI_WHERE": PANEL_VI_WHERE,
               "defaults": defaults}
        for n in (b for b in cls.body if isinstance(b, ast.AnnAssign)):
            value = eval(compile(ast.Expression(n.value), "panel", "eval"), env) if n.value is not None else None
            setattr(self, n.target.id, value)
        self.weightsPath = Path(".")  # what ctkPathLineEdit gives for an empty path
        for k, v in changes.items():
            setattr(self, k, v)


def command_settings(request: Request):
    """The Settings the command line builds from the arguments the panel's request becomes."""
    args = ["reconstruct", "f.nii.gz", "--mask", "m.nii.gz", "--method", request.method, "--device", request.device,
            "--out-dir", "o", *vi_sampling_args(request.samples), *edge_args(request.method, request.edges),
            *noisy_region_args(request.method, request.noisy_regions), *vi_where_args(request.method, request.vi_where)]
    for flag, value in (("--lambda", request.lam), ("--iterations", request.iterations), ("--weights", request.weights)):
        if value is not None:
            args += [flag, str(value)]
    return reconstruct_settings(build_parser().parse_args(args))


@pytest.mark.parametrize("method", defaults.METHODS)
def test_the_panels_defaults_give_the_command_lines_defaults(method):
    panel = Panel(method=label_of(PANEL_METHODS, method))
    from_panel = command_settings(request_from_panel(panel))
    plain = reconstruct_settings(build_parser().parse_args(["reconstruct", "f.nii.gz", "--mask", "m.nii.gz",
                                                             "--method", method, "--out-dir", "o"]))
    if method.startswith("pdi-vi"):  # the panel always sends its iteration count (the documented default)
        plain.iterations = defaults.VI_ITERATIONS
    assert from_panel == plain


def test_a_fixed_lambda_and_a_weights_file_reach_the_command():
    panel = Panel(method="MEDI", lambdaAuto=False, lam=0.02, weightsPath=Path("/w/adapted.safetensors"))
    s = command_settings(request_from_panel(panel))
    assert s.lam == 0.02 and s.weights == "/w/adapted.safetensors"
    assert request_from_panel(Panel(method="TKD", lambdaAuto=False, lam=0.02)).lam is None  # TKD has none


def test_the_panels_sample_count_chooses_the_estimator():
    """K = 0 (the panel's default) is PDI-VI's closed-form expectation, the command's default; K >= 1 draws
    K Monte Carlo samples per iteration."""
    exact = command_settings(request_from_panel(Panel(method="PDI-VI1")))
    assert Panel().samples == 0 and exact.vi_estimator == "exact"
    drawn = command_settings(request_from_panel(Panel(method="PDI-VI1", samples=7)))
    assert drawn.vi_estimator == "mc" and drawn.samples == 7


def test_the_panels_noisy_regions_switch_reaches_the_methods_that_read_a_noise_map():
    """Checked (the default) the command's --noisy-regions auto; unchecked, off for MEDI and PDI(-VI), which read a
    noise map, and nothing for TKD and Tikhonov, which do not."""
    assert Panel().noisyRegionsAuto is True
    for method in defaults.METHODS:
        settings = command_settings(request_from_panel(Panel(method=label_of(PANEL_METHODS, method),
                                                             noisyRegionsAuto=False)))
        assert settings.noisy_regions == ("auto" if method in defaults.WITHOUT_NOISE_MAP else "off"), method
        default = command_settings(request_from_panel(Panel(method=label_of(PANEL_METHODS, method))))
        assert default.noisy_regions == "auto"


def test_the_panels_edge_source_reaches_the_methods_whose_tv_spares_edges():
    """'TV edges from' sets MEDI's --medi-edges and PDI-VI1's --vi-edges; 'Automatic' leaves both at the command's
    default, and the methods without a TV prior get the same settings whatever is chosen."""
    medi = command_settings(request_from_panel(Panel(method="MEDI", edges="PDI's map")))
    assert medi.medi_edges == "pdi" and Panel().edges == label_of(PANEL_EDGES, "auto")
    assert command_settings(request_from_panel(Panel(method="MEDI", edges="Magnitude"))).medi_edges == "magnitude"
    for label, value in PANEL_EDGES.items():
        assert command_settings(request_from_panel(Panel(method="PDI-VI1", edges=label))).vi_edges == value
        for method in ("PDI", "PDI-VI2", "Tikhonov", "TKD"):
            assert command_settings(request_from_panel(Panel(method=method, edges=label))) == \
                command_settings(request_from_panel(Panel(method=method)))
    with pytest.raises(ValueError, match="edge source"):
        edge_args("medi", "truth")


def test_the_panels_choice_of_where_pdi_vis_map_is_kept_reaches_both_pdi_vi_methods():
    """'Fine-tuned map kept' sets PDI-VI1's and PDI-VI2's --vi-where; 'Automatic' (the panel's default) leaves the
    command's per-method default, and the methods that fine-tune nothing get the same settings whatever is chosen."""
    assert Panel().viWhere == label_of(PANEL_VI_WHERE, "auto")
    for label, value in PANEL_VI_WHERE.items():
        for method in ("PDI-VI1", "PDI-VI2"):
            assert command_settings(request_from_panel(Panel(method=method, viWhere=label))).vi_where == value
        for method in ("PDI", "MEDI", "Tikhonov", "TKD"):
            assert command_settings(request_from_panel(Panel(method=method, viWhere=label))) == \
                command_settings(request_from_panel(Panel(method=method)))
    with pytest.raises(ValueError, match="PDI-VI's map"):
        vi_where_args("pdi-vi1", "nowhere")


def test_the_settings_a_method_does_not_use_are_greyed_out(monkeypatch):
    """On every parameter change the panel enables the edge source for MEDI and PDI-VI1 only, K, the iteration
    count and where the fine-tuned map is kept for PDI-VI only: the settings the command receives for that method
    (request_from_panel)."""
    module, _ = load_module_with_stand_ins(monkeypatch)
    w = make_widget(module)
    w.ui.edgesComboBox, w.ui.samplesSliderWidget, w.ui.iterationsSpinBox = Widget(), Widget(), Widget()
    w.ui.viWhereComboBox = Widget()
    w._process = object()  # a run in progress: the controls follow the method all the same
    expected = {"PDI": (False, False), "PDI-VI1": (True, True), "PDI-VI2": (False, True), "MEDI": (True, False),
                "Tikhonov": (False, False), "TKD": (False, False)}
    assert set(expected) == set(PANEL_METHODS)
    for label, (edges, vi) in expected.items():
        w._parameterNode = types.SimpleNamespace(method=label)
        module.PDIQSMWidget._checkCanApply(w)
        assert (w.ui.edgesComboBox.enabled, w.ui.samplesSliderWidget.enabled, w.ui.iterationsSpinBox.enabled,
                w.ui.viWhereComboBox.enabled) == (edges, vi, vi, vi), label
        request = request_from_panel(Panel(method=label, edges="PDI's map", samples=3, iterations=7,
                                           viWhere="Everywhere"))
        assert bool(edge_args(request.method, request.edges)) == edges and (request.iterations == 7) == vi
        assert bool(vi_where_args(request.method, request.vi_where)) == vi


def test_panel_choices_and_defaults_are_the_librarys():
    panel = Panel()
    assert PANEL_METHODS[panel.method] == defaults.METHOD and PANEL_UNITS[panel.units] == defaults.UNITS
    assert PANEL_DEVICES[panel.device] == defaults.DEVICE and panel.iterations == defaults.VI_ITERATIONS
    assert set(PANEL_METHODS.values()) == set(defaults.METHODS)


# --- the widget with stand-ins for Qt and Slicer's application layer -------------------------------------

class Widget(types.SimpleNamespace):
    def __init__(self, **kw) -> None:
        super().__init__(enabled=True, toolTip="", text="", **kw)

    def connect(self, signal, slot) -> None:
        self.__dict__.setdefault("connections", []).append((signal, slot))

    def setValue(self, v) -> None:
        self.value = v

    def clear(self) -> None:
        self.text = ""

    def appendPlainText(self, line) -> None:
        self.text += line + "\n"

    def toPlainText(self) -> str:
        return self.text


class FakeParameterNode:
    """A parameter node wrapper whose connectGui returns ``tag`` (None like Slicer 5.8)."""

    def __init__(self, tag) -> None:
        self.tag = tag
        self.parameterNode = object()
        self.connects = 0
        self.disconnects = []
        self.fieldVolume = None
        self.b0FromGeometry = True
        self.lambdaAuto = True

    def connectGui(self, ui):
        self.connects += 1
        return self.tag

    def disconnectGui(self, tag) -> None:
        self.disconnects.append(tag)


def load_module_with_stand_ins(monkeypatch):
    """PDIQSM.py imported with stand-in qt, ctk, vtk and slicer application modules."""
    qt = types.ModuleType("qt")
    qt.QProcess = type("QProcess", (), {"CrashExit": 1, "NormalExit": 0, "FailedToStart": 0})
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=33)
    slicer = types.ModuleType("slicer")
    for node_class in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
        setattr(slicer, node_class, type(node_class, (), {}))
    slicer.mrmlScene = types.SimpleNamespace(StartCloseEvent=1, EndCloseEvent=2,
                                             GetFirstNodeByClass=lambda c: None)
    errors = []
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda s: s
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.Choice = wrapper.WithinRange = lambda *a, **k: None
    wrapper.parameterNodeWrapper = lambda cls: cls
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *a, **k) -> None:
            pass

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (Base,), {}))
    util = types.ModuleType("slicer.util")

    class Mixin:
        def __init__(self) -> None:
            self.observers = []

        def addObserver(self, *a) -> None:
            self.observers.append(a)

        def removeObserver(self, *a) -> None:  # like Slicer's: removing an absent observer is harmless
            if a in self.observers:
                self.observers.remove(a)

    util.VTKObservationMixin = Mixin
    util.errorDisplay = errors.append
    slicer.util = util
    for name, module in {"qt": qt, "vtk": vtk, "slicer": slicer, "slicer.i18n": i18n,
                         "slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": slm,
                         "slicer.util": util}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("PDIQSM_under_test", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, errors


def make_widget(module):
    w = module.PDIQSMWidget()
    names = ("b0XSpinBox", "b0YSpinBox", "b0ZSpinBox", "lambdaSpinBox", "reconstructButton", "cancelButton",
             "progressBar", "statusLabel", "logTextEdit")
    w.ui = types.SimpleNamespace(**{n: Widget() for n in names})
    w.logic = types.SimpleNamespace(request=lambda p: None,
                                    engine=types.SimpleNamespace(discard=lambda job: discarded.append(job)))
    discarded = []
    w._discarded = discarded
    w._checkCanApply = lambda *a: None
    return w


@pytest.mark.parametrize("tag", [None, "tag-5.10"])
def test_reentering_the_module_does_not_pile_up_gui_connections(monkeypatch, tag):
    module, _ = load_module_with_stand_ins(monkeypatch)
    w = make_widget(module)
    node = FakeParameterNode(tag)
    w.logic.getParameterNode = lambda: node
    for _ in range(3):  # enter, leave, enter, leave, enter
        w.setParameterNode(node)
        w.exit()
    w.setParameterNode(node)
    expected = 1 if tag is None else 4  # 5.8: one live connection kept; later: connect on every entry
    assert node.connects == expected
    assert all(t is not None for t in node.disconnects)  # never disconnectGui(None)
    assert not w.ui.b0XSpinBox.enabled and not w.ui.lambdaSpinBox.enabled


class FakeProcess:
    def __init__(self, output: bytes = b"") -> None:
        self.output = output
        self.deleted = False

    def readAllStandardError(self):
        out, self.output = FakeQByteArray(self.output), b""
        return out

    def deleteLater(self) -> None:
        self.deleted = True

    def errorString(self) -> str:
        return "No such file"


def test_a_crashed_run_adds_nothing_and_says_so(monkeypatch):
    module, errors = load_module_with_stand_ins(monkeypatch)
    w = make_widget(module)
    w._parameterNode = FakeParameterNode("t")
    job = Job(Path("/tmp/pdiqsm-x"), [])
    w._process, w._job = FakeProcess(b"PROGRESS 1/4 pdi\n"), job
    w._onFinished(0, module.qt.QProcess.CrashExit)  # killed by the OOM killer: Qt may say code 0
    assert w._discarded == [job] and w._process is None
    assert errors and "crashed or was killed" in errors[-1]
    assert "PROGRESS 1/4 pdi" in w.ui.logTextEdit.text  # the pipe's last lines reached the log


def test_a_failed_run_names_the_nodes_not_their_temporary_copies(monkeypatch):
    """The command reads private copies of the nodes (``Logic.prepare`` writes them); its warnings in the log and its
    error in the message box name the nodes the user picked."""
    module, errors = load_module_with_stand_ins(monkeypatch)
    w = make_widget(module)
    w._parameterNode = FakeParameterNode("t")
    job = Job(Path("/tmp/pdiqsm-x"), [], names={"/tmp/pdiqsm-x/field.nii.gz": "field 'Phase local'",
                                                 "/tmp/pdiqsm-x/mask.nii.gz": "mask 'Brain'"})
    w._process, w._job = FakeProcess(b"pdiqsm: warning: /tmp/pdiqsm-x/field.nii.gz: 99th percentile of |field| is 75\n"
                                     b"pdiqsm reconstruct: error: /tmp/pdiqsm-x/mask.nii.gz: the mask holds 8 voxels"
                                     b"\n"), job
    w._onFinished(2, module.qt.QProcess.NormalExit)
    assert w._discarded == [job] and errors[-1].endswith("error: mask 'Brain': the mask holds 8 voxels")
    assert "warning: field 'Phase local': 99th percentile" in w.ui.logTextEdit.text
    assert "/tmp/pdiqsm-x" not in w.ui.logTextEdit.text


def test_the_status_line_keeps_a_loops_time_left_beside_its_count(monkeypatch):
    """The command says the time left every 5 s and its count every step: the label shows both, not the count alone a
    second after the estimate (and not a stale estimate once the loop is done or another loop runs)."""
    module, _ = load_module_with_stand_ins(monkeypatch)
    w = make_widget(module)
    seen = []
    for chunk in (b"STATUS running PDI on cpu\nPROGRESS 1/100 vi\nPROGRESS 2/100 vi\n",
                  b"STATUS vi: up to 49 s left\nPROGRESS 3/100 vi\nPROGRESS 4/1", b"00 vi\n", b"PROGRESS 11/11 vi\n",
                  b"PROGRESS 1/97 medi\n", b"STATUS wrote out/x.nii.gz\n"):
        w._process = FakeProcess(chunk)
        w._onOutput()
        seen.append((w.ui.statusLabel.text, w.ui.progressBar.value))
    assert seen == [("vi: 2/100", 2), ("vi: 3/100, up to 49 s left", 3), ("vi: 4/100, up to 49 s left", 4),
                    ("vi: 11/11", 100), ("medi: 1/97", 1), ("wrote out/x.nii.gz", 1)]
    assert "STATUS vi: up to 49 s left" in w.ui.logTextEdit.text  # every line still reaches the log


def test_the_process_is_owned_by_the_panel_not_by_a_python_reference():
    """A parentless QProcess loses its last Python reference inside its own 'finished' slot and PythonQt
    deletes it while it emits (issue 16 point 4): it must have a parent and be deleted later."""
    text = MODULE.read_text()
    assert "qt.QProcess(self.parent)" in text and "qt.QProcess()" not in text and "deleteLater()" in text


def test_a_process_that_fails_to_start_frees_the_buttons(monkeypatch):
    module, errors = load_module_with_stand_ins(monkeypatch)
    w = make_widget(module)
    w._parameterNode = FakeParameterNode("t")
    process = FakeProcess()
    w._process, w._job = process, "job"
    w.ui.reconstructButton.enabled, w.ui.cancelButton.enabled = False, True
    w._onProcessError(module.qt.QProcess.FailedToStart)
    assert w._process is None and process.deleted and w._discarded == ["job"]
    assert w.ui.cancelButton.enabled is False and errors and "No such file" in errors[-1]


def test_the_extension_index_description_holds_the_schemas_required_fields():
    """Slicer's ExtensionsIndex (5.8-5.12) takes JSON catalog entries, schema 1.0.1: required $schema,
    category, scm_url; no other keys than the schema's."""
    entry = json.loads((ROOT / "PDIQSM.json").read_text())
    allowed = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= set(allowed)
    for key, value in entry.items():
        assert isinstance(value, allowed[key]), key
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == ["PyTorch"] and entry.get("scm_type", "git") in ("git", "local")
    assert entry.get("tier", 5) in (1, 3, 5)


def test_the_headless_script_runs_the_test_as_slicers_ctest_does():
    text = (ROOT / "Testing" / "run_slicer_selftest.sh").read_text()
    assert "--no-main-window" in text and "--testing" in text and "selectModule" not in text
    assert "slicer.testing.runUnitTest" in text


def test_the_self_test_skips_when_its_packages_are_missing():
    tree = ast.parse(MODULE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PDIQSMTest")
    run = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    source = ast.unparse(run)
    assert "skipTest" in source and source.index("skipTest") < source.index("test_TKD_and_PDI_on_phantom")
