import pytest
import torch

from custom import RegistrationNet
from custom.plots import display, plot_deformation_grid, plot_jacobian, plot_loss_curves, plot_registration_grid

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape", [(1, 20, 24), (1, 12, 14, 10)])
def test_figures_are_pngs(tmp_path, shape):
    images = [torch.rand(shape) for _ in range(4)]
    ddf = torch.randn(len(shape) - 1, *shape[1:])
    paths = [
        plot_registration_grid(images, images, images, tmp_path / "grid.png", ["a", "b", "c", "d"]),
        plot_loss_curves({"both": [1.0, 0.5], "baseline": [1.0, 0.4]}, tmp_path / "loss.png"),
        plot_deformation_grid(images[0], ddf, tmp_path / "deform.png"),
        plot_jacobian(ddf * 3, tmp_path / "jac.png"),
    ]
    for p in paths:
        assert p.read_bytes().startswith(PNG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deform.png", "grid.png", "jac.png", "loss.png"]


def test_display_with_weights(tmp_path):
    net = RegistrationNet(2, "both")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    dataset = [{"moving": torch.rand(1, 16, 16), "fixed": torch.rand(1, 16, 16)} for _ in range(6)]
    paths = display(RegistrationNet(2, "both"), dataset, tmp_path / "fig", tmp_path / "model.pt")
    assert [p.name for p in paths] == ["registration_grid.png", "deformation_grid.png", "jacobian.png"]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda p: plot_registration_grid([], [], [], p), "same positive number"),  # nothing to draw
        (lambda p: plot_loss_curves({}, p), "no loss curves"),  # no curves
        (lambda p: display(RegistrationNet(2), [{}], p, p / "none.pt"), "does not exist"),  # missing weights
        (lambda p: display(RegistrationNet(2), [], p), "no pairs"),  # empty dataset
    ],
)
def test_bad_plot_inputs(tmp_path, call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(tmp_path)
