"""PDIQSM: quantitative susceptibility mapping with uncertainty, as a 3D Slicer module.

Module, Widget, Logic and Test in Slicer's scripted-module shape. Everything that is not GUI lives in
``PDIQSMLib`` (``PDIQSMLib.slicer_logic`` holds the MRML side), so it is tested outside Slicer.
"""

import os
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

METHODS = {"PDI": "pdi", "PDI-VI1": "pdi-vi1", "PDI-VI2": "pdi-vi2", "MEDI": "medi", "Tikhonov": "tikhonov", "TKD": "tkd"}
UNITS = {"ppm": "ppm", "Hz": "hz", "rad": "rad"}
DEVICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
REQUIRED_PACKAGES = {"nibabel": "nibabel>=5.0", "scipy": "scipy>=1.10", "safetensors": "safetensors>=0.4",
                     "matplotlib": "matplotlib>=3.7"}


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
            "(MEDI spares its edges) and a field noise standard-deviation map (data weight).<br>"
            "<b>Methods</b>: PDI, a 3D U-Net with two decoders that reads the field and its Tikhonov inverse "
            "(weighted by the noise map when given) and gives the mean and the standard deviation "
            "of chi per voxel; PDI-VI1 and PDI-VI2 fine-tune it on your field without labels (with a TV "
            "prior of weight lambda, or a flat prior) using K Monte Carlo samples, tuning every weight "
            "(about 4 s per iteration for a 206x219x52 brain on 2 CPU cores, far less on a GPU), and give the mean-field "
            "standard deviation per voxel (how well the data pin each voxel, given its neighbours: narrower "
            "than PDI's); MEDI, Tikhonov and TKD "
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
        fileNames=[f"{n}.nii.gz" for n in names], nodeNames=names, loadFileType="VolumeFile",
    )


@parameterNodeWrapper
class PDIQSMParameterNode:
    fieldVolume: vtkMRMLScalarVolumeNode
    maskVolume: vtkMRMLScalarVolumeNode
    magnitudeVolume: vtkMRMLScalarVolumeNode
    noiseStdVolume: vtkMRMLScalarVolumeNode
    units: Annotated[str, Choice(list(UNITS))] = "ppm"
    b0Tesla: Annotated[float, WithinRange(0.0, 20.0)] = 3.0
    teSeconds: Annotated[float, WithinRange(0.0, 1.0)] = 0.02
    b0FromGeometry: bool = True
    b0DirX: float = 0.0
    b0DirY: float = 0.0
    b0DirZ: float = 1.0
    method: Annotated[str, Choice(list(METHODS))] = "PDI"
    lam: Annotated[float, WithinRange(0.0, 1.0)] = 0.001
    samples: Annotated[float, WithinRange(1, 50)] = 5
    iterations: Annotated[int, WithinRange(1, 2000)] = 100
    device: Annotated[str, Choice(list(DEVICES))] = "Auto"
    weightsPath: str = ""
    outputMean: vtkMRMLScalarVolumeNode
    outputStd: vtkMRMLScalarVolumeNode


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
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

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
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _updateB0FromGeometry(self, fromGeometry: bool) -> None:
        for box in (self.ui.b0XSpinBox, self.ui.b0YSpinBox, self.ui.b0ZSpinBox):
            box.enabled = not fromGeometry
        p = self._parameterNode
        if fromGeometry and p and p.fieldVolume:
            from PDIQSMLib.slicer_logic import default_b0_dir

            p.b0DirX, p.b0DirY, p.b0DirZ = default_b0_dir(p.fieldVolume)

    def _checkCanApply(self, caller=None, event=None) -> None:
        from PDIQSMLib.slicer_logic import problems

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
        process = qt.QProcess()
        env = qt.QProcessEnvironment.systemEnvironment()
        for key, value in self._job.env.items():
            env.insert(key, value)
        process.setProcessEnvironment(env)
        process.connect("readyReadStandardError()", self._onOutput)
        process.connect("finished(int,QProcess::ExitStatus)", self._onFinished)
        self._process = process
        process.start(self._job.args[0], self._job.args[1:])

    def _onOutput(self) -> None:
        from PDIQSMLib.progress import parse_line

        self._buffer += bytes(self._process.readAllStandardError()).decode(errors="replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self.ui.logTextEdit.appendPlainText(line)
            step = parse_line(line)
            if step:
                done, total, label = step
                self.ui.progressBar.setValue(int(100 * done / max(total, 1)))
                self.ui.statusLabel.text = f"{label}: {done}/{total}"
            elif line.startswith("STATUS "):
                self.ui.statusLabel.text = line[len("STATUS "):]

    def _onFinished(self, exitCode, exitStatus) -> None:
        from PDIQSMLib.slicer_logic import last_error

        job, self._process, self._job = self._job, None, None
        self._setRunning(False)
        if job is None:  # cancelled
            return
        if exitCode != 0:
            self.logic.engine.discard(job)
            message = last_error(self.ui.logTextEdit.toPlainText(), exitCode)
            self.ui.statusLabel.text = _("Failed")
            slicer.util.errorDisplay(_("Reconstruction failed: ") + message)
            return
        mean, std = self.logic.engine.finish(job, self._request)
        self._parameterNode.outputMean = mean
        if std is not None:
            self._parameterNode.outputStd = std
        self.ui.progressBar.setValue(100)
        self.ui.statusLabel.text = _("Done")

    def onCancel(self) -> None:
        if self._process is None:
            return
        job, self._job = self._job, None
        self._process.kill()
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
        from PDIQSMLib.slicer_logic import Request

        return Request(
            field=p.fieldVolume, mask=p.maskVolume, magnitude=p.magnitudeVolume, noise_std=p.noiseStdVolume,
            units=UNITS[p.units], b0=p.b0Tesla if p.units != "ppm" else None, te=p.teSeconds if p.units == "rad" else None,
            b0_dir=None if p.b0FromGeometry else (p.b0DirX, p.b0DirY, p.b0DirZ), method=METHODS[p.method],
            lam=p.lam if p.method in ("MEDI", "Tikhonov", "PDI-VI1") else None, samples=int(p.samples),
            iterations=int(p.iterations) if p.method.startswith("PDI-VI") else None, device=DEVICES[p.device],
            weights=p.weightsPath or None, output_mean=p.outputMean, output_std=p.outputStd,
        )

    def ensureDependencies(self) -> bool:
        """torch through the PyTorch extension; other packages installed on first use after the user agrees.
        Nothing is installed in testing mode."""
        import importlib.util

        missing = [pkg for mod, pkg in REQUIRED_PACKAGES.items() if importlib.util.find_spec(mod) is None]
        if importlib.util.find_spec("torch") is None:
            if slicer.app.testingEnabled():
                raise RuntimeError("PyTorch is not installed (testing mode installs nothing)")
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("PDIQSM needs PyTorch: install the PyTorch extension, restart, and retry."))
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                return False
        if missing:
            if slicer.app.testingEnabled():
                raise RuntimeError(f"missing Python packages: {', '.join(missing)} (testing mode installs nothing)")
            if not slicer.util.confirmOkCancelDisplay(_("PDIQSM needs these Python packages: ") + ", ".join(missing)
                                                      + _(". Install them now?")):
                return False
            slicer.util.pip_install(" ".join(missing))
        return True

    def reconstruct(self, request, progress=None):
        """Synchronous reconstruction (console and self-test): (mean node, std node or None)."""
        self.ensureDependencies()
        return self.engine.reconstruct(request, progress=progress)


class PDIQSMTest(ScriptedLoadableModuleTest):
    """Builds a small simulated phantom in the scene and runs TKD and PDI through the logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
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
