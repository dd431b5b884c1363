"""PDIQSM: quantitative susceptibility mapping with uncertainty, as a 3D Slicer module.

Module, Widget, Logic and Test in Slicer's scripted-module shape. Everything that is not GUI lives in
``PDIQSMLib`` (``PDIQSMLib.slicer_logic`` holds the MRML side), so it is tested outside Slicer.
"""

import os
import pathlib
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# PDIQSMLib is installed beside this file; these modules import nothing but numpy (which Slicer ships),
# so the panel loads before the reconstruction's own packages are installed.
from PDIQSMLib import defaults
from PDIQSMLib.slicer_logic import (PANEL_DEVICES, PANEL_EDGES, PANEL_METHODS, PANEL_UNITS, PANEL_VI_WHERE,
                                    TORCH_REQUIREMENT, label_of)


class PDIQSM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PDIQSM")
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["The PDIQSM authors"]
        self.parent.helpText = _(
            "Susceptibility map (ppm) and its uncertainty from a local field map.<br>"
            "<b>Inputs</b>: the local (background-removed) field, in ppm, Hz (give B0) or radians of phase "
            "at one echo (give B0 and TE); a brain mask on the same grid; optionally a magnitude image "
            "(MEDI's and PDI-VI1's TV prior spares its edges; 'TV edges from' may take them from PDI's own map "
            "instead) and a field noise standard-deviation map (data weight).<br>"
            "<b>Methods</b>: PDI, a 3D U-Net with two decoders that reads the field and its Tikhonov inverse "
            "(weighted by the noise map when given) and gives the mean and the standard deviation "
            "of chi per voxel; PDI-VI1 and PDI-VI2 fine-tune it on your field without labels (with a TV "
            "prior of weight lambda, or a flat prior), taking the KL's expectation exactly (K = 0, the default) or "
            "with K Monte Carlo samples, tuning the decoders (about 2-4 s per iteration for a 160^3 brain on 2 CPU "
            "cores, far less on a GPU; it stops early once the map no longer moves), and give the mean-field "
            "standard deviation per voxel (how well the data pin each voxel, given its neighbours: narrower "
            "than PDI's); 'Fine-tuned map kept' says where their map replaces PDI's (automatic: for PDI-VI1 only "
            "where the field disagrees with PDI's map when PDI explains the field down to its noise floor, else "
            "everywhere; for PDI-VI2 only where the field disagrees); MEDI, Tikhonov and TKD "
            "are the classic MAP baselines. B0 defaults to scanner z seen through the volume's geometry.<br>"
            "<b>Outputs</b>: the mean map (grey, -0.15..0.15 ppm, background) and the standard-deviation "
            "map (Iron colours, foreground at 50 %)."
        )
        self.parent.acknowledgementText = _(
            "Method: J. Zhang, H. Zhang, M. Sabuncu, P. Spincemaille, T. Nguyen, Y. Wang, "
            "\"Bayesian Learning of Probabilistic Dipole Inversion for Quantitative Susceptibility Mapping\", "
            "MIDL 2020. The bundled model was trained on simulated phantoms; see its model card."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A small simulated phantom (field, mask, true chi) in the Sample Data module."""
    import SampleData

    here = os.path.dirname(__file__)
    data = os.path.join(here, "Resources", "SampleData")
    names = ["PDIQSMPhantom_field", "PDIQSMPhantom_mask", "PDIQSMPhantom_chi"]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="PDIQSM", sampleName="PDIQSMPhantom",
        thumbnailFileName=os.path.join(here, "Resources", "Icons", "PDIQSM.png"),
        uris=[qt.QUrl.fromLocalFile(os.path.join(data, f"{n}.nii.gz")).toString() for n in names],
        fileNames=[f"{n}.nii.gz" for n in names], nodeNames=names, loadFileTypes=["VolumeFile"] * len(names),
    )


@parameterNodeWrapper
class PDIQSMParameterNode:
    """Every setting of the panel; widget types follow Slicer's GUI connectors (Testing/test_slicer_module_static.py
    checks each field's type against its widget's connector). Defaults come from PDIQSMLib.defaults, as the
    command line's do; PDIQSMLib.slicer_logic.request_from_panel maps them to the command."""

    fieldVolume: vtkMRMLScalarVolumeNode
    maskVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode]
    maskSegment: str = ""  # a segmentation as the mask: this segment (name or ID); empty: all of them
    magnitudeVolume: vtkMRMLScalarVolumeNode
    noiseStdVolume: vtkMRMLScalarVolumeNode
    units: Annotated[str, Choice(list(PANEL_UNITS))] = label_of(PANEL_UNITS, defaults.UNITS)
    b0Tesla: Annotated[float, WithinRange(0.0, 20.0)] = defaults.B0_TESLA
    teSeconds: Annotated[float, WithinRange(0.0, 1.0)] = defaults.TE_SECONDS
    b0FromGeometry: bool = True
    b0DirX: Annotated[float, WithinRange(-1.0, 1.0)] = 0.0
    b0DirY: Annotated[float, WithinRange(-1.0, 1.0)] = 0.0
    b0DirZ: Annotated[float, WithinRange(-1.0, 1.0)] = 1.0
    method: Annotated[str, Choice(list(PANEL_METHODS))] = label_of(PANEL_METHODS, defaults.METHOD)
    lambdaAuto: bool = True
    lam: Annotated[float, WithinRange(0.0, 1.0)] = defaults.MEDI_LAMBDA
    edges: Annotated[str, Choice(list(PANEL_EDGES))] = label_of(PANEL_EDGES, "auto")  # MEDI's and PDI-VI1's TV edges
    noisyRegionsAuto: bool = True  # no noise std: MEDI and PDI find where the field is noise (--noisy-regions auto)
    samples: Annotated[float, WithinRange(0, 50)] = defaults.PANEL_VI_SAMPLES  # 0: exact expectation
    iterations: Annotated[int, WithinRange(1, 2000)] = defaults.VI_ITERATIONS
    viWhere: Annotated[str, Choice(list(PANEL_VI_WHERE))] = label_of(PANEL_VI_WHERE, "auto")  # PDI-VI's map kept
    device: Annotated[str, Choice(list(PANEL_DEVICES))] = label_of(PANEL_DEVICES, defaults.DEVICE)
    weightsPath: pathlib.Path  # empty: the bundled model
    regionsSegmentation: vtkMRMLSegmentationNode  # optional: a region table after Reconstruct
    referenceRegion: str = "whole-brain"  # whole-brain, none, or a segment of the regions
    outputMean: vtkMRMLScalarVolumeNode
    outputStd: vtkMRMLScalarVolumeNode
    outputTable: vtkMRMLTableNode


class PDIQSMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._job = None
        self._request = None
        self._buffer = ""
        self._status = None  # the status line's text as the command's lines arrive (StatusText), made per run
        self._connectedNode = None  # the parameter node whose GUI connection is live

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PDIQSM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PDIQSMLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstruct)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.b0FromGeometryCheckBox.connect("toggled(bool)", self._updateB0FromGeometry)
        self.ui.lambdaAutoCheckBox.connect("toggled(bool)", self._updateLambdaAuto)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.onCancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._disconnectGui()
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def _disconnectGui(self) -> None:
        """Undo connectGui. On Slicer 5.8 connectGui returns no tag and disconnectGui(None) does nothing:
        the connection then stays live and is not made again on re-entry (setParameterNode), so that
        connectors do not pile up and reset the settings."""
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._connectedNode = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fieldVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fieldVolume = first

    def setParameterNode(self, inputParameterNode: Optional[PDIQSMParameterNode]) -> None:
        if self._parameterNode:
            self._disconnectGui()
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            node = self._parameterNode.parameterNode
            if self._connectedNode is not node:
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
                self._connectedNode = node
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._updateB0FromGeometry(self._parameterNode.b0FromGeometry)
            self._updateLambdaAuto(self._parameterNode.lambdaAuto)
            self._checkCanApply()

    def _updateLambdaAuto(self, automatic: bool) -> None:
        self.ui.lambdaSpinBox.enabled = not automatic

    def _updateB0FromGeometry(self, fromGeometry: bool) -> None:
        for box in (self.ui.b0XSpinBox, self.ui.b0YSpinBox, self.ui.b0ZSpinBox):
            box.enabled = not fromGeometry
        p = self._parameterNode
        if fromGeometry and p and p.fieldVolume:
            from PDIQSMLib.slicer_logic import default_b0_dir

            p.b0DirX, p.b0DirY, p.b0DirZ = default_b0_dir(p.fieldVolume)

    def _checkCanApply(self, caller=None, event=None) -> None:
        from PDIQSMLib.slicer_logic import method_controls, problems

        if self._parameterNode:  # grey out the settings the chosen method does not use
            for name, used in method_controls(self._parameterNode.method).items():
                getattr(self.ui, name).enabled = used
        if self._process is not None:
            return
        found = problems(self.logic.request(self._parameterNode)) if self._parameterNode else ["no parameter node"]
        self.ui.reconstructButton.enabled = not found
        self.ui.reconstructButton.toolTip = _("Reconstruct the susceptibility map") if not found else "; ".join(found)

    def onReconstruct(self) -> None:
        if not self.logic.ensureDependencies():
            return
        from PDIQSMLib.errors import InputError

        self._request = self.logic.request(self._parameterNode)
        try:
            self._job = self.logic.engine.prepare(self._request)
        except InputError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.setValue(0)
        self._setRunning(True)
        # Parented to the panel: Qt owns it, so it is not deleted while it emits 'finished' when the
        # last Python reference goes in the slot; it is deleted later by Qt (deleteLater).
        process = qt.QProcess(self.parent)
        env = qt.QProcessEnvironment.systemEnvironment()
        for key, value in self._job.env.items():
            env.insert(key, value)
        process.setProcessEnvironment(env)
        process.connect("readyReadStandardError()", self._onOutput)
        process.connect("finished(int,QProcess::ExitStatus)", self._onFinished)
        process.connect("errorOccurred(QProcess::ProcessError)", self._onProcessError)
        self._process = process
        self._buffer = ""
        self._status = None  # a new run's status line starts afresh (_onOutput)
        process.start(self._job.args[0], self._job.args[1:])

    def _onOutput(self) -> None:
        from PDIQSMLib.progress import parse_line
        from PDIQSMLib.slicer_logic import StatusText, decode_output

        if self._process is None:
            return
        if self._status is None:
            self._status = StatusText()
        self._buffer += decode_output(self._process.readAllStandardError())
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if self._job is not None:  # the command names its private input files; the user knows the nodes
                line = self._job.readable(line)
            self.ui.logTextEdit.appendPlainText(line)
            step = parse_line(line)
            if step:
                done, total, _ = step
                self.ui.progressBar.setValue(int(100 * done / max(total, 1)))
            text = self._status.read(line)
            if text is not None:
                self.ui.statusLabel.text = text

    def _onProcessError(self, error) -> None:
        """A process that could not start never emits 'finished': end the run here (other errors, such as
        a crash, are followed by 'finished', which reports them)."""
        if error != qt.QProcess.FailedToStart or self._process is None:
            return
        process, job, self._process, self._job = self._process, self._job, None, None
        process.deleteLater()
        if job is not None:
            self.logic.engine.discard(job)
        self._setRunning(False)
        self.ui.statusLabel.text = _("Failed")
        slicer.util.errorDisplay(_("Could not start the reconstruction: ") + str(process.errorString()))

    def _onFinished(self, exitCode, exitStatus) -> None:
        from PDIQSMLib.slicer_logic import process_outcome

        if self._process is None:
            return
        self._onOutput()  # what is left in the pipe
        process, job, self._process, self._job = self._process, self._job, None, None
        process.deleteLater()
        self._setRunning(False)
        if job is None:  # cancelled
            return
        message = process_outcome(int(exitCode), exitStatus == qt.QProcess.CrashExit,
                                  self.ui.logTextEdit.toPlainText() + "\n" + self._buffer, job)
        if message is not None:
            self.logic.engine.discard(job)
            self.ui.statusLabel.text = _("Failed")
            slicer.util.errorDisplay(_("Reconstruction failed: ") + message)
            return
        mean, std = self.logic.engine.finish(job, self._request)
        self._parameterNode.outputMean = mean
        if std is not None:
            self._parameterNode.outputStd = std
        if self.logic.engine.last_table is not None:
            self._parameterNode.outputTable = self.logic.engine.last_table
        self.ui.progressBar.setValue(100)
        self.ui.statusLabel.text = _("Done")

    def onCancel(self) -> None:
        if self._process is None:
            return
        job, self._job = self._job, None
        self._process.kill()
        if self._process is not None:
            self._process.waitForFinished(5000)
        if job is not None:
            self.logic.engine.discard(job)
        self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene")

    def _setRunning(self, running: bool) -> None:
        self.ui.reconstructButton.enabled = not running
        self.ui.cancelButton.enabled = running
        if not running:
            self._checkCanApply()


class PDIQSMLogic(ScriptedLoadableModuleLogic):
    """The module's logic: turns the parameter node into a request for ``PDIQSMLib.slicer_logic``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from PDIQSMLib.slicer_logic import Logic

        self.engine = Logic(slicer.mrmlScene)

    def getParameterNode(self):
        return PDIQSMParameterNode(super().getParameterNode())

    def request(self, p: PDIQSMParameterNode):
        from PDIQSMLib.slicer_logic import request_from_panel

        return request_from_panel(p)

    def ensureDependencies(self) -> bool:
        """torch through the PyTorch extension; other packages installed on first use after the user agrees.
        Nothing is installed in testing mode (returns False; the self-test skips)."""
        from PDIQSMLib.slicer_logic import missing_packages, torch_available

        missing = missing_packages()
        if not torch_available():
            if slicer.app.testingEnabled():
                return False
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("PDIQSM needs PyTorch: install the PyTorch extension, restart, and retry."))
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                             torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        if missing:
            if slicer.app.testingEnabled():
                return False
            if not slicer.util.confirmOkCancelDisplay(_("PDIQSM needs these Python packages: ") + ", ".join(missing)
                                                      + _(". Install them now?")):
                return False
            slicer.util.pip_install(" ".join(missing))
        return True

    def reconstruct(self, request, progress=None):
        """Synchronous reconstruction (console and self-test): (mean node, std node or None)."""
        if not self.ensureDependencies():
            raise RuntimeError("PDIQSM's Python packages are missing: " + ", ".join(self.missing()))
        return self.engine.reconstruct(request, progress=progress)

    @staticmethod
    def missing() -> list:
        """What the reconstruction still needs here (torch and pip requirements)."""
        from PDIQSMLib.slicer_logic import missing_packages, torch_available

        return ([] if torch_available() else [f"torch{TORCH_REQUIREMENT} (PyTorch extension)"]) + missing_packages()


class PDIQSMTest(ScriptedLoadableModuleTest):
    """Builds a small simulated phantom in the scene and runs TKD and PDI through the logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        missing = PDIQSMLogic.missing()
        if missing:  # extension build dashboards have no torch: report and skip, do not fail
            self.skipTest("PDIQSM self-test skipped: missing " + ", ".join(missing))
        self.test_TKD_and_PDI_on_phantom()

    def _phantom(self):
        import numpy as np

        from PDIQSMLib import phantoms
        from PDIQSMLib.geometry import Geometry, b0_dir_from_affine
        from PDIQSMLib.simulation import field_of

        ijkToRas = np.array([[0.0, -1.0, 0.0, 20.0], [1.0, 0.0, 0.0, -10.0], [0.0, 0.0, 1.5, 5.0], [0, 0, 0, 1]])
        shape, vs = (40, 40, 28), (1.0, 1.0, 1.5)
        chi = phantoms.sphere(shape, vs, 5.0, 0.2)
        mask = phantoms.sphere(shape, vs, 16.0, 1.0) > 0
        field = field_of(chi, mask, Geometry(vs, b0_dir_from_affine(ijkToRas)), 2.0)
        nodes = []
        for name, array in (("phantom_field", field), ("phantom_mask", mask.astype(np.float32))):
            node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)), ijkToRAS=ijkToRas,
                                                  name=name)
            nodes.append(node)
        return nodes, chi, mask

    def test_TKD_and_PDI_on_phantom(self):
        import numpy as np

        from PDIQSMLib.slicer_logic import GREY, IRON, Request, node_affine

        self.delayDisplay("Simulating a phantom")
        (field, mask), chi, inside = self._phantom()
        logic = PDIQSMLogic()
        for method in ("tkd", "pdi"):
            self.delayDisplay(f"Reconstructing with {method}")
            steps = []
            mean, std = logic.reconstruct(Request(field, mask, method=method, device="cpu"),
                                          progress=lambda *a: steps.append(a))
            self.assertTrue(np.allclose(node_affine(mean), node_affine(field)))
            values = slicer.util.arrayFromVolume(mean).transpose(2, 1, 0)
            sphere = chi > 0
            self.assertGreater(values[sphere].mean(), 0.08)  # truth 0.2 ppm inside the sphere
            self.assertLess(abs(values[inside & ~sphere].mean()), 0.05)
            self.assertEqual(mean.GetDisplayNode().GetColorNodeID(), GREY)
            if method == "pdi":
                self.assertIsNotNone(std)
                self.assertEqual(std.GetDisplayNode().GetColorNodeID(), IRON)
                self.assertTrue((slicer.util.arrayFromVolume(std)[slicer.util.arrayFromVolume(mask) > 0] > 0).all())
        self.delayDisplay("Test passed")
