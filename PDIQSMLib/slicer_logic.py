"""The MRML side of the Slicer module: nodes <-> NIfTI, the background run, output nodes with display.

Imports ``slicer`` for MRML only (never ``qt``), so it runs inside Slicer and under plain Python with
the PyPI package ``slicer-core``. The reconstruction runs as a separate process (``pdiqsm
reconstruct`` through the same Python), whose ``PROGRESS`` lines drive a callback; cancelling ends
the process and leaves no output nodes and no temporary files.

At import it needs only numpy (which Slicer ships): nibabel and the rest of the library are imported
where they are used, so the module's panel loads, and can offer to install what is missing
(``missing_packages``), before any of them is present. The pieces the Qt widget needs to get right
(decoding PythonQt's process output, reading a finished process's status, the panel's parameters as a
request) are plain functions here, tested without Qt.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import defaults
from .errors import Cancelled, InputError
from .geometry import b0_dir_from_affine
from .progress import TIME_LEFT, parse_line
from .units import ppm_per_unit

# Python packages the reconstruction process needs, as pip requirements (torch comes from Slicer's
# PyTorch extension, see TORCH_REQUIREMENT); Slicer ships numpy.
REQUIRED_PACKAGES = {"nibabel": "nibabel>=5.0", "scipy": "scipy>=1.10", "safetensors": "safetensors>=0.4",
                     "matplotlib": "matplotlib>=3.7"}
TORCH_REQUIREMENT = ">=2.2,<=2.13.0"  # the range pyproject.toml accepts


def missing_packages() -> list[str]:
    """pip requirements of the packages that cannot be imported here (torch excluded)."""
    import importlib.util

    return [req for module, req in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None]


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def decode_output(data) -> str:
    """Text of a process's output as Qt hands it over: PythonQt's QByteArray (``.data()`` gives bytes;
    ``bytes(...)`` raises on it), bytes, or str."""
    if isinstance(data, str):
        return data
    if hasattr(data, "data") and callable(data.data):
        data = data.data()
    if isinstance(data, str):
        return data
    return bytes(data).decode("utf-8", errors="replace")


def process_outcome(exit_code: int, crashed: bool, stderr_tail: str, job: Job | None = None) -> str | None:
    """None when a finished ``pdiqsm`` process succeeded; else the message for the user, its input files named by
    their nodes (``job.readable``). A crash (killed, e.g. out of memory) is never a success, whatever exit code Qt
    reports with it."""
    said = last_error(stderr_tail, exit_code) if job is None else job.readable(last_error(stderr_tail, exit_code))
    if crashed:
        return ("the pdiqsm process crashed or was killed (out of memory?); " + said
                if stderr_tail.strip() else "the pdiqsm process crashed or was killed (out of memory?)")
    return said if exit_code != 0 else None

MEAN_WINDOW_PPM = (-0.15, 0.15)
STD_OPACITY = 0.5
GREY = "vtkMRMLColorTableNodeGrey"
IRON = "vtkMRMLColorTableNodeIron"


@dataclass
class Request:
    """What the module's parameter node holds, as plain values and nodes."""

    field: object  # vtkMRMLScalarVolumeNode
    mask: object  # vtkMRMLScalarVolumeNode, vtkMRMLLabelMapVolumeNode or vtkMRMLSegmentationNode
    magnitude: object | None = None
    noise_std: object | None = None
    units: str = defaults.UNITS
    b0: float | None = None
    te: float | None = None
    b0_dir: tuple[float, float, float] | None = None  # None: from the field's geometry
    method: str = defaults.METHOD
    lam: float | None = None
    samples: int = defaults.PANEL_VI_SAMPLES  # 0: exact expectation; K >= 1: K Monte Carlo samples
    iterations: int | None = None
    device: str = defaults.DEVICE
    weights: str | None = None
    output_mean: object | None = None  # existing nodes to fill; None: new nodes named after the field
    output_std: object | None = None
    extra_args: list[str] = field(default_factory=list)
    mask_segment: str | None = None  # a segmentation as the mask: this segment (ID or name); None: all of them
    regions: object | None = None  # vtkMRMLSegmentationNode: one table row per segment
    reference: str = "whole-brain"  # what region means are relative to: whole-brain, none or a segment's name
    output_table: object | None = None  # vtkMRMLTableNode to fill; None: a new one named after the field
    edges: str = "auto"  # where MEDI's and PDI-VI1's TV spares edges: auto, magnitude or pdi (PANEL_EDGES)
    vi_where: str = "auto"  # where PDI-VI's fine-tuned map is kept (PANEL_VI_WHERE; defaults.VI_WHERE)
    noisy_regions: str = "auto"  # without a noise std: auto (where the field is noise, weighed as a map would) or off


# The panel's choices (labels shown) and the command's values.
PANEL_METHODS = {"PDI": "pdi", "PDI-VI1": "pdi-vi1", "PDI-VI2": "pdi-vi2", "MEDI": "medi", "Tikhonov": "tikhonov",
                 "TKD": "tkd"}
PANEL_UNITS = {"ppm": "ppm", "Hz": "hz", "rad": "rad"}
PANEL_DEVICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
PANEL_EDGES = {"Automatic": "auto", "Magnitude": "magnitude", "PDI's map": "pdi"}
PANEL_VI_WHERE = {"Automatic": "auto", "Gated": "gated", "Everywhere": "everywhere",
                  "Where the field disagrees": "discrepant"}
EDGE_FLAGS = {"medi": "--medi-edges", "pdi-vi1": "--vi-edges"}  # the methods whose TV prior spares edges


def method_controls(method_label: str) -> dict[str, bool]:
    """Which of the panel's method settings the chosen method uses (the others are greyed out): the edge source for
    MEDI and PDI-VI1, K, the iteration count and where the fine-tuned map is kept for PDI-VI (``request_from_panel``
    sends them for those only)."""
    method = PANEL_METHODS[method_label]
    vi = method.startswith("pdi-vi")
    return {"edgesComboBox": method in EDGE_FLAGS, "samplesSliderWidget": vi, "iterationsSpinBox": vi,
            "viWhereComboBox": vi}


def edge_args(method: str, edges: str) -> list[str]:
    """The panel's edge source as command-line options: nothing for 'auto' (the command's default: the magnitude's
    edges when one is given; without one MEDI's TV is everywhere and PDI-VI1 spares PDI's own edges) and for the
    methods without a TV prior."""
    if edges not in PANEL_EDGES.values():
        raise ValueError(f"unknown edge source {edges!r}; expected one of {', '.join(PANEL_EDGES.values())}")
    return [EDGE_FLAGS[method], edges] if method in EDGE_FLAGS and edges != "auto" else []


def vi_where_args(method: str, where: str) -> list[str]:
    """The panel's 'Fine-tuned map kept' as command-line options: nothing for 'auto' (the command's default, per
    method) and for the methods that fine-tune nothing."""
    if where not in defaults.VI_WHERE:
        raise ValueError(f"unknown place for PDI-VI's map {where!r}; expected one of {', '.join(defaults.VI_WHERE)}")
    return ["--vi-where", where] if method.startswith("pdi-vi") and where != "auto" else []


def noisy_region_args(method: str, noisy_regions: str) -> list[str]:
    """The panel's noisy-regions switch as command-line options: nothing for 'auto' (the command's default) and for
    the methods that read no noise map (TKD, Tikhonov)."""
    if noisy_regions not in defaults.NOISY_REGIONS:
        raise ValueError(f"unknown noisy-regions setting {noisy_regions!r}; "
                         f"expected {' or '.join(defaults.NOISY_REGIONS)}")
    return ["--noisy-regions", "off"] if noisy_regions == "off" and method not in defaults.WITHOUT_NOISE_MAP else []


def label_of(choices: dict[str, str], value: str) -> str:
    """The panel label of a command value (the parameter node's defaults come from defaults.py)."""
    return next(label for label, v in choices.items() if v == value)


def _unset_path(path) -> bool:
    return path is None or str(path).strip() in ("", ".")


def vi_sampling_args(samples: int) -> list[str]:
    """The panel's K as command-line options: 0 takes PDI-VI's expectation in closed form (the command's
    default), K >= 1 draws K Monte Carlo samples per iteration (the paper's)."""
    k = int(samples)
    return ["--vi-estimator", "exact"] if k <= 0 else ["--vi-estimator", "mc", "--samples", str(k)]


def request_from_panel(p) -> Request:
    """The request that the panel's parameters ``p`` (a parameter node, or any object with its fields)
    stand for: the one mapping of GUI settings to the command, so that the panel's defaults give the
    command's defaults for every method (tested against the command line)."""
    method = PANEL_METHODS[p.method]
    automatic = p.lambdaAuto and method in ("medi", "tikhonov", "pdi-vi1")
    units = PANEL_UNITS[p.units]
    return Request(
        field=p.fieldVolume, mask=p.maskVolume, magnitude=p.magnitudeVolume, noise_std=p.noiseStdVolume,
        units=units, b0=p.b0Tesla if units != "ppm" else None, te=p.teSeconds if units == "rad" else None,
        b0_dir=None if p.b0FromGeometry else (p.b0DirX, p.b0DirY, p.b0DirZ), method=method,
        lam=None if automatic or method not in defaults.LAMBDA_METHODS else float(p.lam),
        samples=int(p.samples), iterations=int(p.iterations) if method.startswith("pdi-vi") else None,
        device=PANEL_DEVICES[p.device], weights=None if _unset_path(p.weightsPath) else str(p.weightsPath),
        output_mean=p.outputMean, output_std=p.outputStd,
        mask_segment=(p.maskSegment or "").strip() or None, regions=p.regionsSegmentation,
        reference=(p.referenceRegion or "").strip() or "whole-brain", output_table=p.outputTable,
        edges=PANEL_EDGES[p.edges], noisy_regions="auto" if p.noisyRegionsAuto else "off",
        vi_where=PANEL_VI_WHERE[p.viWhere],
    )


def node_affine(node) -> np.ndarray:
    """The node's IJK-to-RAS matrix as a 4x4 array (NIfTI's world frame is RAS too)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def node_array(node) -> np.ndarray:
    """Voxel values in I, J, K order (Slicer's arrays are K, J, I)."""
    import slicer.util

    return np.ascontiguousarray(slicer.util.arrayFromVolume(node).transpose(2, 1, 0))


def default_b0_dir(node) -> tuple[float, float, float]:
    """Scanner z in the node's voxel axes: the library's rule applied to the node's geometry."""
    return b0_dir_from_affine(node_affine(node))


def is_segmentation(node) -> bool:
    return node is not None and node.IsA("vtkMRMLSegmentationNode")


def segment_ids(segmentation, wanted: str | None = None) -> list[str]:
    """IDs of the segments: all, or the one whose ID or name is ``wanted``; [] when it is not there."""
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    if wanted is None:
        return ids
    return [i for i in ids if i == wanted or seg.GetSegment(i).GetName() == wanted][:1]


def segmentation_labels(segmentation, reference, wanted: str | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """The segments as integer labels on ``reference``'s voxel grid (I, J, K order; 1, 2, ... in segment
    order) and their names, by Slicer's own export (a segment covering part of a voxel follows Slicer's
    rasterisation)."""
    import slicer
    import vtk

    ids = segment_ids(segmentation, wanted)
    array = vtk.vtkStringArray()
    for i in ids:
        array.InsertNextValue(i)
    scene = segmentation.GetScene()
    temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__pdiqsm_labels__")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, array, temp, reference):
            raise InputError(segmentation.GetName(), "could not be turned into labels on the field's grid")
        labels = node_array(temp).astype(np.int32)
    finally:
        scene.RemoveNode(temp)
    seg = segmentation.GetSegmentation()
    return labels, {k: seg.GetSegment(i).GetName() for k, i in enumerate(ids, start=1)}


def _segmentation_problems(role: str, node, wanted: str | None) -> list[str]:
    if not segment_ids(node):
        return [f"{role} '{node.GetName()}' has no segment"]
    if wanted is not None and not segment_ids(node, wanted):
        return [f"{role} '{node.GetName()}' has no segment '{wanted}'"]
    return []


def problems(request: Request) -> list[str]:
    """What stops a run, in words for the GUI (empty when the request can run)."""
    out = []
    if request.method not in defaults.METHODS:
        return [f"unknown method {request.method!r}"]
    if request.field is None or request.field.GetImageData() is None:
        return ["select a field volume"]
    if request.mask is None or (not is_segmentation(request.mask) and request.mask.GetImageData() is None):
        return ["select a brain mask"]
    if is_segmentation(request.mask):
        out += _segmentation_problems("mask", request.mask, request.mask_segment)
    if request.regions is not None:
        out += _segmentation_problems("regions", request.regions, None)
        names = [request.regions.GetSegmentation().GetSegment(i).GetName() for i in segment_ids(request.regions)]
        if request.reference not in ("whole-brain", "none") and request.reference not in names:
            out.append(f"reference '{request.reference}' is not a segment of '{request.regions.GetName()}'")
    shape = request.field.GetImageData().GetDimensions()
    for role, node in (("mask", request.mask), ("magnitude", request.magnitude), ("noise std", request.noise_std)):
        if role == "mask" and is_segmentation(node):
            continue
        if node is None:
            continue
        if node.GetImageData() is None or node.GetImageData().GetDimensions() != shape:
            out.append(f"{role} '{node.GetName()}' has another size than the field")
        elif not np.allclose(node_affine(node), node_affine(request.field), atol=1e-4):
            out.append(f"{role} '{node.GetName()}' has another geometry than the field")
    if not out and not is_segmentation(request.mask) and request.mask.GetImageData().GetScalarRange()[1] <= 0:
        out.append(f"mask '{request.mask.GetName()}' is empty")
    if request.edges == "pdi" and request.magnitude is not None and request.method in EDGE_FLAGS:
        out.append(f"edges from PDI's map take no magnitude: clear '{request.magnitude.GetName()}' or take the "
                   "edges from the magnitude")
    try:
        ppm_per_unit(request.units, request.b0, request.te)
    except InputError as exc:
        out.append(str(exc))
    return out


class ProcessRunner:
    """Runs a command, passing each stderr line to ``on_line``; ``cancel`` (an Event) ends it."""

    def __call__(self, args: list[str], on_line: Callable[[str], None], cancel: threading.Event,
                 env: dict[str, str] | None = None) -> tuple[int, str]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                env=env or process_environment())
        watcher = threading.Thread(target=self._watch, args=(proc, cancel), daemon=True)
        watcher.start()
        lines = []
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            on_line(lines[-1])
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        return proc.returncode, "\n".join(lines[-20:])

    @staticmethod
    def _watch(proc: subprocess.Popen, cancel: threading.Event) -> None:
        while proc.poll() is None:
            if cancel.wait(0.1):
                proc.terminate()
                return


def line_handler(progress: Callable[[int, int, str], None] | None, status: Callable[[str], None] | None):
    """A callback for the process's stderr lines: PROGRESS lines to ``progress``, STATUS lines to ``status``."""
    def on_line(line: str) -> None:
        step = parse_line(line)
        if step and progress:
            progress(*step)
        elif line.startswith("STATUS ") and status:
            status(line[len("STATUS "):])
    return on_line


class StatusText:
    """What the panel's status line says as the command's stderr lines arrive: a PROGRESS line gives 'label: done/total'
    and, while that loop runs, the time left its last note gave ('vi: 12/100, up to 80 s left'), so the count's next
    line does not wipe the estimate a second after it appeared; other STATUS lines as they are; None for the rest."""

    def __init__(self) -> None:
        self._left: dict[str, str] = {}  # loop label: its last 'about / up to N s left'

    def read(self, line: str) -> str | None:
        step = parse_line(line)
        if step:
            done, total, label = step
            left = self._left.get(label) if done < total else None
            return f"{label}: {done}/{total}" + (f", {left}" if left else "")
        if not line.startswith("STATUS "):
            return None
        text = line[len("STATUS "):]
        said = TIME_LEFT.match(text)
        if said:
            self._left[said.group(1)] = said.group(2)
        return text


def last_error(stderr_tail: str, code: int) -> str:
    """The command's one-line error message (its last line), or the exit code."""
    lines = [line for line in stderr_tail.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"pdiqsm exited with code {code}"


def process_environment() -> dict[str, str]:
    """This environment with PDIQSMLib's parent folder first on PYTHONPATH (so ``-m PDIQSMLib.cli``
    works from a checkout and from the module's install folder alike)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python_executable() -> str:
    """Slicer's PythonSlicer when present (inside Slicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


@dataclass
class Job:
    """A prepared run: its private folder, the command and its environment; ``Logic.finish`` or
    ``Logic.discard`` ends it."""

    work: Path
    args: list[str]
    method: str = "medi"
    env: dict[str, str] = field(default_factory=lambda: process_environment())
    names: dict[str, str] = field(default_factory=dict)  # an input file's path: what it holds ("mask 'Brain'")

    def readable(self, text: str) -> str:
        """``text`` (the command's words) with the job's private input files named by the nodes they hold."""
        for path, name in self.names.items():
            text = text.replace(path, name)
        return text

    @property
    def outputs(self) -> tuple[Path, Path]:
        paths = self._paths()
        return paths["mean"], paths["std"]

    @property
    def regions_table(self) -> Path:
        return self._paths()["regions"]

    def _paths(self) -> dict[str, Path]:
        from .pipeline import output_paths

        return output_paths(self.work / "out", self.work / "field.nii.gz", "pdiqsm", self.method)


class Logic:
    """Reconstruct from nodes in ``scene``; usable from the Python console without any GUI.

    ``reconstruct`` runs synchronously (process output read on this thread); a GUI runs the same
    three steps itself: ``prepare`` (files and command), the process (e.g. a QProcess), then
    ``finish`` (output nodes) or ``discard``.
    """

    def __init__(self, scene, runner: Callable | None = None) -> None:
        self.scene = scene
        self.runner = runner or ProcessRunner()
        self.last_table = None  # the region table node of the last finished run (None without regions)

    def prepare(self, request: Request) -> Job:
        """Check the request and write its inputs; raises InputError naming what is missing or wrong."""
        found = problems(request)
        if found:
            raise InputError(request.field.GetName() if request.field is not None else "field", "; ".join(found))
        work = Path(tempfile.mkdtemp(prefix="pdiqsm-"))
        try:
            names: dict[str, str] = {}
            return Job(work, self._command(request, work, names), request.method, names=names)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def finish(self, job: Job, request: Request):
        """Output nodes from a finished job's files (mean, std or None); the job's folder is removed."""
        try:
            mean_path, std_path = job.outputs
            mean = self._output_node(request, mean_path, "chi_mean", request.output_mean)
            std = self._output_node(request, std_path, "chi_std", request.output_std) if std_path.exists() else None
            self._display(mean, std)
            self.last_table = (self._table_node(request, job.regions_table, request.output_table)
                               if request.regions is not None else None)
            return mean, std
        finally:
            self.discard(job)

    @staticmethod
    def discard(job: Job) -> None:
        shutil.rmtree(job.work, ignore_errors=True)

    def reconstruct(self, request: Request, progress: Callable[[int, int, str], None] | None = None,
                    status: Callable[[str], None] | None = None, cancel: threading.Event | None = None):
        """Run the reconstruction; returns (mean node, std node or None). Raises InputError, Cancelled,
        or RuntimeError with the command's message; in every failure no node is added."""
        job = self.prepare(request)
        cancel = cancel or threading.Event()
        try:
            code, tail = self.runner(job.args, line_handler(progress, status), cancel, job.env)
            if cancel.is_set():
                raise Cancelled("reconstruction cancelled")
            if code != 0:
                raise RuntimeError(job.readable(last_error(tail, code)))
        except BaseException:
            self.discard(job)
            raise
        return self.finish(job, request)

    def _command(self, request: Request, work: Path, names: dict[str, str]) -> list[str]:
        """The ``pdiqsm reconstruct`` command for ``request``, its inputs written under ``work``; ``names`` gets each
        input file's path and the node it holds."""
        from .io import Volume, save_volume

        affine = node_affine(request.field)
        paths = {}
        for role, node in (("field", request.field), ("mask", request.mask), ("magnitude", request.magnitude),
                           ("noise", request.noise_std)):
            if node is None:
                continue
            if is_segmentation(node):  # the segment (or all of them) on the field's grid
                data = (segmentation_labels(node, request.field, request.mask_segment)[0] > 0).astype(np.float32)
                if not data.any():
                    raise InputError(node.GetName(), "the mask segment covers no voxel of the field")
            else:
                data = node_array(node).astype(np.float32)
            paths[role] = save_volume(work / f"{role}.nii.gz", data, Volume(data, affine, None))
            names[str(paths[role])] = f"{'noise std' if role == 'noise' else role} '{node.GetName()}'"
        region_args = []
        if request.regions is not None:
            labels, segment_names = segmentation_labels(request.regions, request.field)
            labels_path = save_volume(work / "labels.nii.gz", labels.astype(np.float32),
                                      Volume(labels.astype(np.float32), affine, None))
            names[str(labels_path)] = f"regions '{request.regions.GetName()}'"
            from .regions import names_tsv

            (work / "labels.tsv").write_text(names_tsv(segment_names))
            region_args = ["--labels", str(labels_path), "--names", str(work / "labels.tsv"), "--reference",
                           request.reference]
        args = [python_executable(), "-m", "PDIQSMLib.cli", "reconstruct", str(paths["field"]), "--mask",
                str(paths["mask"]), "--method", request.method, "--units", request.units, "--device", request.device,
                "--out-dir", str(work / "out"), "--progress", "lines", *vi_sampling_args(request.samples),
                *edge_args(request.method, request.edges), *noisy_region_args(request.method, request.noisy_regions),
                *vi_where_args(request.method, request.vi_where)]
        optional = {"--magnitude": paths.get("magnitude"), "--noise-std": paths.get("noise"), "--b0": request.b0,
                    "--te": request.te, "--lambda": request.lam, "--iterations": request.iterations,
                    "--weights": request.weights}
        for flag, value in optional.items():
            if value is not None:
                args += [flag, str(value)]
        if request.b0_dir is not None:
            args += ["--b0-dir", *map(str, request.b0_dir)]
        return args + region_args + list(request.extra_args)

    def _table_node(self, request: Request, path: Path, node=None):
        """The region table (``pdiqsm stats`` columns) as a table node; units in the column properties, the
        reference and the interval's error model in the node's attributes."""
        import vtk

        from .regions import read_table_tsv

        rows = read_table_tsv(path)
        comments = [x[2:] for x in path.read_text().splitlines() if x.startswith("# ")]
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{request.field.GetName()}_regions")
        table = node.GetTable()
        table.Initialize()
        columns = list(rows[0]) if rows else []
        for name in columns:
            text = any(isinstance(r.get(name), str) for r in rows)
            array = vtk.vtkStringArray() if text else (vtk.vtkIntArray() if name in ("label", "voxels", "voxels_outside_mask")
                                                       else vtk.vtkDoubleArray())
            array.SetName(name)
            for r in rows:
                array.InsertNextValue(str(r.get(name, "")) if text else r.get(name, float("nan")))
            table.AddColumn(array)
        node.Modified()
        for name in columns:
            if name.endswith("_ppm"):
                node.SetColumnUnitLabel(name, "ppm")
            elif name == "volume_ml":
                node.SetColumnUnitLabel(name, "mL")
        for line in comments:
            key, _, value = line.partition(": ")
            node.SetAttribute(f"PDIQSM.{key}", value)
        return node

    def _output_node(self, request: Request, path: Path, suffix: str, node=None):
        import nibabel as nib
        import vtk

        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{request.field.GetName()}_{suffix}")
        m = vtk.vtkMatrix4x4()
        request.field.GetIJKToRASMatrix(m)  # the input's geometry, exactly
        node.SetIJKToRASMatrix(m)
        import slicer.util

        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(data.transpose(2, 1, 0)))
        node.SetIJKToRASMatrix(m)
        node.SetAttribute("PDIQSM.units", "ppm")
        node.SetVoxelValueUnits(_ppm())
        return node

    def _display(self, mean, std) -> None:
        mean.CreateDefaultDisplayNodes()
        d = mean.GetDisplayNode()
        d.SetAndObserveColorNodeID(GREY)
        d.AutoWindowLevelOff()
        lo, hi = MEAN_WINDOW_PPM
        d.SetWindowLevel(hi - lo, (hi + lo) / 2)
        if std is not None:
            std.CreateDefaultDisplayNodes()
            s = std.GetDisplayNode()
            s.SetAndObserveColorNodeID(IRON)
            s.AutoWindowLevelOn()
            s.ApplyThresholdOn()
            s.SetLowerThreshold(1e-9)
            s.SetUpperThreshold(1e9)
        for composite in self._composites():
            composite.SetBackgroundVolumeID(mean.GetID())
            if std is not None:
                composite.SetForegroundVolumeID(std.GetID())
                composite.SetForegroundOpacity(STD_OPACITY)

    def _composites(self):
        n = self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
        return [self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(n)]


def _ppm():
    import slicer

    entry = slicer.vtkCodedEntry()
    entry.SetValueSchemeMeaning("ppm", "UCUM", "ppm")
    return entry
