"""The module's logic against real MRML (PyPI slicer-core): geometry, values, display, progress, cancel, errors."""

import tempfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicer

from conftest import write_nifti
from PDIQSMLib import phantoms
from PDIQSMLib.errors import Cancelled, InputError
from PDIQSMLib.geometry import Geometry, b0_dir_from_affine
from PDIQSMLib.pipeline import Settings, reconstruct_files
from PDIQSMLib.simulation import field_of
from PDIQSMLib.slicer_logic import GREY, IRON, Logic, Request, default_b0_dir, node_affine

OBLIQUE = np.array([[0.0, -1.2, 0.1, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.1, 1.5, 3.0], [0, 0, 0, 1]])
LEFT = np.diag([-1.0, 1.0, 1.5, 1.0])  # one axis flipped: a left-handed voxel frame


def orthonormalise(affine):
    a = affine.copy()
    u, s, vt = np.linalg.svd(a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0))
    a[:3, :3] = (u @ vt) * np.linalg.norm(affine[:3, :3], axis=0)
    return a


def in_file_order(array_ijk, node_aff, file_aff):
    """A node's IJK array re-indexed to the file's voxel order. Slicer stores a left-handed file in a
    right-handed frame by reversing K, so the two index the same physical voxels differently; the map
    between them must be a signed axis permutation with an integer shift."""
    t = np.linalg.inv(file_aff) @ node_aff
    perm = np.round(t[:3, :3]).astype(int)
    assert np.allclose(t[:3, :3], perm, atol=1e-6) and np.allclose(t[:3, 3], np.round(t[:3, 3]), atol=1e-4)
    order = [int(np.nonzero(perm[:, j])[0][0]) for j in range(3)]  # node axis j -> file axis order[j]
    out = np.transpose(array_ijk, np.argsort(order))
    for file_axis in range(3):
        node_axis = order.index(file_axis)
        if perm[file_axis, node_axis] < 0:
            out = np.flip(out, axis=file_axis)
    return out


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(s)
    s.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    yield s
    colors.SetMRMLScene(None)


def load(scene, path, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def tilted(degrees: float = 32.0) -> np.ndarray:
    """A frame whose voxel axes are turned so that B0 lies ``degrees`` off the third axis (as
    ``pdiqsm simulate --b0-dir`` writes it), with 1 x 1.2 x 1.5 mm voxels and an offset origin."""
    from PDIQSMLib.geometry import affine_for_b0

    t = np.radians(degrees)
    return affine_for_b0((1.0, 1.2, 1.5), (np.sin(t) * 0.6, np.sin(t) * 0.8, np.cos(t)), (4.0, -7.0, 2.0))


@pytest.fixture(params=["oblique", "left-handed"])
def case(request, tmp_path, scene):
    return build_case(request.param, tmp_path, scene)


@pytest.fixture(params=["oblique", "left-handed", "tilted-32"])
def any_frame(request, tmp_path, scene):
    """The two frames of ``case`` and one with B0 32 degrees off the third axis (the geometry tests only)."""
    return build_case(request.param, tmp_path, scene)


def build_case(name, tmp_path, scene):
    affine = {"oblique": orthonormalise(OBLIQUE), "left-handed": LEFT, "tilted-32": tilted()}[name]
    shape = (28, 30, 20)
    vs = tuple(np.linalg.norm(affine[:3, :3], axis=0))
    g = Geometry(vs, b0_dir_from_affine(affine))
    chi = phantoms.sphere(shape, vs, 4.0, 0.2)
    mask = phantoms.sphere(shape, vs, 12.0, 1.0) > 0
    field = field_of(chi, mask, g, 2.0)
    paths = {"field": write_nifti(tmp_path / "f.nii.gz", field, affine),
             "mask": write_nifti(tmp_path / "m.nii.gz", mask, affine)}
    nodes = {k: load(scene, p, k) for k, p in paths.items()}
    return {"scene": scene, "paths": paths, "nodes": nodes, "affine": affine, "tmp": tmp_path, "chi": chi,
            "name": name, "mask": mask}


def test_nodes_keep_the_nifti_geometry_and_b0_matches_library(case):
    field = case["nodes"]["field"]
    values = in_file_order(slicer.util.arrayFromVolume(field).transpose(2, 1, 0), node_affine(field), case["affine"])
    assert np.allclose(values, nib.load(str(case["paths"]["field"])).get_fdata(), atol=1e-7)
    # the same physical direction (scanner z) in either voxel frame
    world = lambda aff, b: (aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0)) @ np.asarray(b)  # noqa: E731
    assert np.allclose(world(node_affine(field), default_b0_dir(field)), [0, 0, 1], atol=1e-6)
    assert np.allclose(world(case["affine"], b0_dir_from_affine(case["affine"])), [0, 0, 1], atol=1e-6)


def test_tkd_through_logic_matches_library_with_geometry_and_display(case):
    scene, nodes = case["scene"], case["nodes"]
    steps = []
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    mean, std = Logic(scene).reconstruct(Request(nodes["field"], nodes["mask"], method="tkd"),
                                         progress=lambda *a: steps.append(a))
    assert std is None and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 1
    assert mean.GetName() == "field_chi_mean"
    assert np.allclose(node_affine(mean), node_affine(nodes["field"]), atol=1e-9)
    reconstruct_files(case["paths"]["field"], case["paths"]["mask"], case["tmp"] / "lib", Settings(method="tkd"))
    expected = nib.load(str(case["tmp"] / "lib" / "f_tkd_chi-mean.nii.gz")).get_fdata()
    got = in_file_order(slicer.util.arrayFromVolume(mean).transpose(2, 1, 0), node_affine(mean), case["affine"])
    assert np.allclose(got, expected, atol=1e-6)
    d = mean.GetDisplayNode()
    assert d.GetColorNodeID() == GREY and not d.GetAutoWindowLevel()
    assert d.GetWindow() == pytest.approx(0.3) and d.GetLevel() == pytest.approx(0.0)
    assert mean.GetVoxelValueUnits().GetCodeValue() == "ppm"
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == mean.GetID()


def test_pdi_through_logic_gives_std_overlay(case):
    scene, nodes = case["scene"], case["nodes"]
    mean, std = Logic(scene).reconstruct(Request(nodes["field"], nodes["mask"], method="pdi", device="cpu"))
    assert std is not None and std.GetName() == "field_chi_std"
    s = slicer.util.arrayFromVolume(std).transpose(2, 1, 0)
    mask = slicer.util.arrayFromVolume(nodes["mask"]).transpose(2, 1, 0) > 0
    assert np.all(s[mask] > 0) and np.all(np.isfinite(s))
    assert np.allclose(node_affine(std), node_affine(nodes["field"]), atol=1e-9)
    sd = std.GetDisplayNode()
    assert sd.GetColorNodeID() == IRON and sd.GetApplyThreshold() and sd.GetLowerThreshold() > 0
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == std.GetID() and composite.GetForegroundOpacity() == pytest.approx(0.5)


def test_progress_and_status_lines_reach_the_callbacks(case):
    scene, nodes = case["scene"], case["nodes"]
    steps, notes = [], []
    Logic(scene).reconstruct(Request(nodes["field"], nodes["mask"], method="medi", iterations=4),
                             progress=lambda *a: steps.append(a), status=notes.append)
    assert steps[0] == (1, 4, "medi") and steps[-1][0] == steps[-1][1]
    assert any(n.startswith("medi:") for n in notes) and any(n.startswith("wrote") for n in notes)


def test_cancel_leaves_no_nodes_and_no_temporary_files(case):
    scene, nodes = case["scene"], case["nodes"]
    tmp_root = Path(tempfile.gettempdir())
    before_dirs = set(tmp_root.glob("pdiqsm-*"))
    before = scene.GetNumberOfNodes()
    cancel = threading.Event()

    def on_progress(done, total, label):
        cancel.set()  # cancel at the first step

    request = Request(nodes["field"], nodes["mask"], method="medi", iterations=100000, extra_args=["--pad", "2"])
    with pytest.raises(Cancelled):
        Logic(scene).reconstruct(request, progress=on_progress, cancel=cancel)
    assert scene.GetNumberOfNodes() == before
    assert set(tmp_root.glob("pdiqsm-*")) == before_dirs


@pytest.mark.parametrize("problem", ["no mask", "other geometry", "nan", "hz without b0", "constant"])
def test_bad_input_gives_message_and_no_nodes(case, problem):
    """The message names the node at fault, never the run's private copy of it (a temporary file)."""
    scene, nodes = case["scene"], case["nodes"]
    request = Request(nodes["field"], nodes["mask"], method="tkd")
    if problem == "no mask":
        request.mask = None
        phrase = "mask"
    elif problem == "other geometry":
        other = write_nifti(case["tmp"] / "o.nii.gz", np.ones((28, 30, 20)), np.diag([2.0, 2.0, 2.0, 1.0]))
        request.mask = load(scene, other, "other")
        phrase = "geometry"
    elif problem == "nan":
        arr = slicer.util.arrayFromVolume(nodes["field"])
        arr[5, 10, 10] = np.nan
        slicer.util.arrayFromVolumeModified(nodes["field"])
        phrase = f"field '{nodes['field'].GetName()}': field contains 1 NaN"
    elif problem == "constant":  # MEDI's automatic lambda has no noise level to read
        slicer.util.arrayFromVolume(nodes["field"])[:] = 0.01
        slicer.util.arrayFromVolumeModified(nodes["field"])
        request.method = "medi"
        phrase = f"field '{nodes['field'].GetName()}': the field is constant inside the mask"
    else:
        request.units = "hz"
        phrase = "B0"
    before = scene.GetNumberOfNodes()
    with pytest.raises((InputError, RuntimeError)) as raised:
        Logic(scene).reconstruct(request)
    assert phrase in str(raised.value) and "pdiqsm-" not in str(raised.value)
    assert scene.GetNumberOfNodes() == before


def test_checking_a_request_does_not_copy_the_mask(case, monkeypatch):
    """problems() runs on every parameter change in the panel: it reads the mask's scalar range, never
    a copy of its voxels (issue 16 point 9), and still finds an empty mask."""
    import PDIQSMLib.slicer_logic as logic

    def no_copy(node):
        raise AssertionError("problems() copied a volume")

    monkeypatch.setattr(logic, "node_array", no_copy)
    nodes = case["nodes"]
    assert logic.problems(Request(nodes["field"], nodes["mask"])) == []
    slicer.util.updateVolumeFromArray(nodes["mask"], np.zeros_like(slicer.util.arrayFromVolume(nodes["mask"])))
    assert logic.problems(Request(nodes["field"], nodes["mask"])) == ["mask 'mask' is empty"]


def test_edges_from_pdis_map_with_a_magnitude_are_refused_before_a_run(case):
    """The command refuses PDI's map as the edge source when a magnitude is given; the panel says so first, for
    the methods that take edges only."""
    from PDIQSMLib.slicer_logic import problems

    nodes = case["nodes"]
    for method in ("medi", "pdi-vi1"):
        said = problems(Request(nodes["field"], nodes["mask"], magnitude=nodes["field"], method=method, edges="pdi"))
        assert said == ["edges from PDI's map take no magnitude: clear 'field' or take the edges from the magnitude"]
        assert problems(Request(nodes["field"], nodes["mask"], method=method, edges="pdi")) == []
    assert problems(Request(nodes["field"], nodes["mask"], magnitude=nodes["field"], method="pdi", edges="pdi")) == []


def segmentation_from(scene, labels_file_order, affine, name):
    """A segmentation node made, as a user would, by importing a label map volume read from a NIfTI file
    on the field's grid (one segment per label value)."""
    tmp = Path(tempfile.mkdtemp())
    path = write_nifti(tmp / f"{name}.nii.gz", labels_file_order, affine)
    lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name}_labelmap")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(lab)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
    scene.RemoveNode(lab)
    return seg


def test_segmentations_as_mask_and_regions_give_a_table_node(any_frame):
    """A segmentation as the mask gives the same map as the mask volume; a segmentation of regions gives a
    table node whose rows are the library's region statistics of that map (values, names, units)."""
    from PDIQSMLib.regions import region_stats

    case = any_frame
    scene, nodes = case["scene"], case["nodes"]
    mask = nib.load(str(case["paths"]["mask"])).get_fdata() > 0
    chi_shape = mask.shape
    regions = np.zeros(chi_shape)
    regions[case["chi"] > 0.1] = 1  # the sphere
    shell = mask & (case["chi"] == 0)
    shell[:, :, : chi_shape[2] // 2] = False
    regions[shell] = 2
    seg_mask = segmentation_from(scene, mask.astype(float), case["affine"], "brain")
    seg_regions = segmentation_from(scene, regions, case["affine"], "regions")
    names = seg_regions.GetSegmentation()
    ids = [names.GetNthSegmentID(i) for i in range(names.GetNumberOfSegments())]
    names.GetSegment(ids[0]).SetName("sphere")
    names.GetSegment(ids[1]).SetName("upper shell")
    from PDIQSMLib.slicer_logic import segmentation_labels

    exported, exported_names = segmentation_labels(seg_regions, nodes["field"])  # node IJK order
    back = in_file_order(exported, node_affine(nodes["field"]), case["affine"])
    assert np.array_equal(back, regions.astype(int)) and exported_names == {1: "sphere", 2: "upper shell"}
    logic = Logic(scene)
    by_volume, _ = logic.reconstruct(Request(nodes["field"], nodes["mask"], method="tkd"))
    by_segment, _ = logic.reconstruct(Request(nodes["field"], seg_mask, method="tkd", regions=seg_regions,
                                              reference="upper shell"))
    a, b = slicer.util.arrayFromVolume(by_volume), slicer.util.arrayFromVolume(by_segment)
    assert np.allclose(a, b, atol=1e-6)
    table = logic.last_table
    assert table is not None and table.GetNumberOfRows() == 2
    column = lambda name: [table.GetTable().GetColumnByName(name).GetValue(i) for i in range(2)]  # noqa: E731
    assert column("name") == ["sphere", "upper shell"]
    recon = in_file_order(b.transpose(2, 1, 0), node_affine(by_segment), case["affine"])
    expected = region_stats(recon, mask, regions.astype(int), tuple(np.linalg.norm(case["affine"][:3, :3], axis=0)),
                            names={1: "sphere", 2: "upper shell"}, reference=2)["rows"]
    assert column("mean_ppm") == pytest.approx([r["mean_ppm"] for r in expected], abs=1e-6)
    assert column("voxels") == [r["voxels"] for r in expected]
    assert column("mean_ppm")[1] == pytest.approx(0.0, abs=1e-9) and column("mean_ppm")[0] > 0.1
    assert table.GetColumnUnitLabel("mean_ppm") == "ppm" and "upper shell" in table.GetAttribute("PDIQSM.reference")
    assert logic.reconstruct(Request(nodes["field"], nodes["mask"], method="tkd"))[1] is None and logic.last_table is None
    from PDIQSMLib.regions import read_names

    job = logic.prepare(Request(nodes["field"], seg_mask, method="tkd", regions=seg_regions))
    try:  # the command's names file holds the segments' names only; the job names each private file by its node
        assert read_names(job.work / "labels.tsv") == {1: "sphere", 2: "upper shell"}
        assert job.names == {str(job.work / "field.nii.gz"): f"field '{nodes['field'].GetName()}'",
                             str(job.work / "mask.nii.gz"): "mask 'brain'",
                             str(job.work / "labels.nii.gz"): "regions 'regions'"}
    finally:
        logic.discard(job)


def test_segmentation_problems_are_named(case):
    from PDIQSMLib.slicer_logic import problems

    scene, nodes = case["scene"], case["nodes"]
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    assert problems(Request(nodes["field"], empty, method="tkd")) == ["mask 'nothing' has no segment"]
    mask = nib.load(str(case["paths"]["mask"])).get_fdata()
    seg = segmentation_from(scene, mask, case["affine"], "brain")
    assert problems(Request(nodes["field"], seg, method="tkd", mask_segment="cortex")) == ["mask 'brain' has no segment 'cortex'"]
    said = problems(Request(nodes["field"], nodes["mask"], method="tkd", regions=seg, reference="caudate"))
    assert said == ["reference 'caudate' is not a segment of 'brain'"]


def test_the_b0_direction_read_from_the_nodes_reconstructs_the_truth(any_frame):
    """In every frame (oblique, left-handed, B0 32 degrees off the third axis) the logic's TKD lands near
    the true sphere; forcing B0 along the third voxel axis instead is far worse in the tilted frame, so the
    direction really comes from the node's geometry."""
    from PDIQSMLib.metrics import nrmse

    case = any_frame
    scene, nodes = case["scene"], case["nodes"]
    logic = Logic(scene)
    mean, _ = logic.reconstruct(Request(nodes["field"], nodes["mask"], method="tkd"))
    got = in_file_order(slicer.util.arrayFromVolume(mean).transpose(2, 1, 0), node_affine(mean), case["affine"])
    error = nrmse(got, case["chi"], case["mask"])
    assert error < 60.0, error
    if case["name"] == "tilted-32":
        forced, _ = logic.reconstruct(Request(nodes["field"], nodes["mask"], method="tkd", b0_dir=(0.0, 0.0, 1.0)))
        wrong = in_file_order(slicer.util.arrayFromVolume(forced).transpose(2, 1, 0), node_affine(forced), case["affine"])
        print(f"TKD through the logic, 32-degree frame: {error:.1f} % from the geometry, "
              f"{nrmse(wrong, case['chi'], case['mask']):.1f} % with B0 forced along the third axis")
        assert nrmse(wrong, case["chi"], case["mask"]) > error + 15.0
