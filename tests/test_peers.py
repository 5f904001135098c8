"""The peer tools in their own environments (custom.peers) and their runner (custom.peer_run): the conversion of
each tool's field to our displacement, checked against torch's and ITK's own conventions; the environments'
bookkeeping; and each tool run on tiny subject pairs by the 3D benchmark where its environment was made
(``python -m custom peer_envs``)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from custom.accuracy_subjects import NO_REGISTRATION_ROW, _section_rows, run_subject_pairs
from custom.data import make_demo
from custom.peer_run import main as run_peer
from custom.peer_run import normalized_to_displacement, physical_to_displacement
from custom.peers import MARKER, PEER_ROWS, PEER_TOOLS, make_peer_envs, peer_python
from custom.warp import SpatialTransformer

ENVS = Path(__file__).resolve().parents[1] / ".peers"


@pytest.mark.parametrize(
    "sizes,seed",
    [((6, 7, 8), 0), ((9, 5, 4), 1)],  # Z, Y, X all different: an axis mix-up shows  # another order of sizes
)
def test_normalized_coordinates_warp_as_torch_grid_sample(sizes, seed):
    """A field of grid_sample coordinates over a SimpleITK-ordered (Z, Y, X) volume, converted, warps the same
    volume in nibabel's order (X, Y, Z) with our SpatialTransformer exactly as grid_sample does."""
    g = torch.Generator().manual_seed(seed)
    volume = torch.rand(1, 1, *sizes, generator=g, dtype=torch.float64)
    identity = F.affine_grid(torch.eye(3, 4, dtype=torch.float64)[None], [1, 1, *sizes], align_corners=True)
    coords = identity + 0.15 * torch.randn(identity.shape, generator=g, dtype=torch.float64)
    expected = F.grid_sample(volume, coords, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    ddf = torch.from_numpy(normalized_to_displacement(coords[0].numpy())).permute(3, 0, 1, 2)[None].double()
    warped = SpatialTransformer("bilinear", "border")(volume.permute(0, 1, 4, 3, 2), ddf)[0, 0]
    torch.testing.assert_close(warped, expected.permute(2, 1, 0), atol=1e-5, rtol=0)


def test_identity_coordinates_are_no_displacement():
    identity = F.affine_grid(torch.eye(3, 4)[None], [1, 1, 3, 4, 5], align_corners=True)[0].numpy()
    assert normalized_to_displacement(identity).shape == (5, 4, 3, 3)
    np.testing.assert_allclose(normalized_to_displacement(identity), 0, atol=1e-6)


@pytest.mark.parametrize(
    "direction,spacing,physical,voxels",
    [
        (np.eye(3), (1.0, 1.0, 1.0), (1.0, -2.0, 3.0), (1.0, -2.0, 3.0)),  # 1 mm isotropic: the same numbers
        (np.eye(3), (2.0, 0.5, 1.0), (1.0, 1.0, 1.0), (0.5, 2.0, 1.0)),  # anisotropic voxels
        (np.diag([-1.0, -1.0, 1.0]), (1.0, 1.0, 2.0), (1.0, 1.0, 1.0), (-1.0, -1.0, 0.5)),  # LPS axes flipped
        (np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]]), (1.0, 2.0, 1.0), (2.0, 3.0, 0.0), (3.0, 1.0, 0.0)),  # swap
    ],
)
def test_physical_displacement_to_voxels(direction, spacing, physical, voxels):
    """An ITK field (Z, Y, X, 3) of one physical vector becomes (X, Y, Z, 3) of that vector in voxel steps."""
    field = np.broadcast_to(np.array(physical, dtype=np.float32), (2, 3, 4, 3))
    out = physical_to_displacement(field, direction, np.array(spacing))
    assert out.shape == (4, 3, 2, 3)
    np.testing.assert_allclose(out[1, 2, 0], voxels, atol=1e-6)


BAD_RUNS = [
    # (arguments, error, message)
    (["nobody", "m.nii.gz", "f.nii.gz", "out"], SystemExit, "usage: peer_run.py"),  # unknown tool
    (["elastix", "m.nii.gz"], SystemExit, "usage: peer_run.py"),  # too few arguments
    (["elastix", "missing.nii.gz", "missing.nii.gz", "out"], FileNotFoundError, "expected an image file"),  # no file
]


@pytest.mark.parametrize("args,error,message", BAD_RUNS)
def test_peer_run_refuses_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        run_peer(args)


def test_peer_run_refuses_images_on_two_grids(tmp_path):
    import nibabel as nib

    for name, shape in (("m", (4, 5, 6)), ("f", (4, 5, 7))):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    with pytest.raises(ValueError, match="the peers register images on one grid"):
        run_peer(["elastix", str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _fake_env(root: Path, tool: str, requirements) -> None:
    """An environment folder as make_peer_envs leaves it: a Python and the marker."""
    (root / tool / "bin").mkdir(parents=True)
    (root / tool / "bin" / "python").symlink_to("/usr/bin/env")
    (root / tool / MARKER).write_text(json.dumps({"requirements": requirements}))


def test_peer_python_of_a_current_environment(tmp_path):
    _fake_env(tmp_path, "elastix", list(PEER_TOOLS["elastix"]))
    assert peer_python(tmp_path, "elastix") == (tmp_path / "elastix" / "bin" / "python", "")
    assert make_peer_envs("elastix", str(tmp_path)) == {"elastix": str(tmp_path / "elastix" / "bin" / "python")}


@pytest.mark.parametrize(
    "requirements,reason",
    [
        (None, "no elastix environment at"),  # never made (or unfinished: no marker)
        (["itk-elastix==0.0.1"], "has other requirements than"),  # made from older pins
    ],
)
def test_peer_python_says_why_not(tmp_path, requirements, reason):
    if requirements is not None:
        _fake_env(tmp_path, "elastix", requirements)
    python, why = peer_python(tmp_path, "elastix")
    assert python is None and reason in why and "python -m custom peer_envs --peers elastix" in why


def test_make_peer_envs_refuses_an_unknown_tool(tmp_path):
    with pytest.raises(
        ValueError, match=r"peers must be among \['fireants', 'convexadam', 'elastix'\], got \['ants'\]"
    ):
        make_peer_envs("elastix,ants", str(tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """Three tiny labelled subjects with native scans."""
    return make_demo(tmp_path_factory.mktemp("peers") / "demo", num_subjects=3, shape=(40, 48, 36))


@pytest.mark.slow
@pytest.mark.parametrize("tool", list(PEER_TOOLS))
def test_peer_tool_rows_on_real_style_pairs(subjects, tmp_path, tool):
    """Each tool (where its environment was made) registers the aligned subject pair through its own Python: its
    rows beat no registration, with their folding and the cost of their own processes."""
    python, why = peer_python(ENVS, tool)
    if python is None:
        pytest.skip(why)
    sections = run_subject_pairs(str(subjects), 1, "auto", [tool], 1, 0, tmp_path, ours=[], peer_envs=str(ENVS))
    rows = [name for name, (row_tool, _) in PEER_ROWS.items() if row_tool == tool]
    aligned = sections["aligned -> aligned"]["summary"]
    assert list(aligned) == [NO_REGISTRATION_ROW, *rows]
    for row in rows:
        assert aligned[row]["dice_mean"]["mean"] > aligned[NO_REGISTRATION_ROW]["dice_mean"]["mean"]
        assert 0 <= aligned[row]["nonpositive_percent"]["mean"] < 5
        assert aligned[row]["cpu_s"]["mean"] > 0.5 and 0.05 < aligned[row]["peak_rss_gib"]["mean"] < 8
    assert list(sections) == ["aligned -> aligned"]  # the demo subjects have no native scans


def test_peer_rows_run_in_the_aligned_section_only(capsys):
    rows = {NO_REGISTRATION_ROW: None, "ours": ("ours", []), "FireANTs": ("peer", ["python", "fireants", "{}"])}
    assert _section_rows(rows, "aligned -> aligned") == rows
    assert list(_section_rows(rows, "native -> aligned")) == [NO_REGISTRATION_ROW, "ours"]
    assert "not run in this section (they take images on one grid): FireANTs" in capsys.readouterr().out


def test_absent_peer_environments_skip_their_rows(subjects, tmp_path, capsys):
    sections = run_subject_pairs(str(subjects), 1, "auto", list(PEER_TOOLS), 1, 0, tmp_path, ours=[], peer_envs=".x")
    assert list(sections["aligned -> aligned"]["summary"]) == [NO_REGISTRATION_ROW]
    out = capsys.readouterr().out
    assert all(f"{tool} rows skipped: no {tool} environment at .x/{tool}" in out for tool in PEER_TOOLS)
