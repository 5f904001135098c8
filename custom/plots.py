"""Figures (matplotlib, headless Agg): the seed paper's 3x4 registration grid, loss curves, a deformation-grid
overlay and a Jacobian-determinant map. 3-D inputs are shown by their middle slice along the last axis.
Every figure is written to a temporary name and renamed.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from custom.atomic import atomic_path  # noqa: E402
from custom.metrics import jacobian_determinant  # noqa: E402

__all__ = ["plot_registration_grid", "plot_loss_curves", "plot_deformation_grid", "plot_jacobian", "display"]

PathLike = Union[str, Path]


def _plane(x: torch.Tensor) -> np.ndarray:
    """A 2-D numpy view of a ``(C, H, W[, D])`` or ``(H, W[, D])`` tensor: first channel, middle slice."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.dim() >= 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 3:
        x = x[..., x.shape[-1] // 2]
    return x.numpy()


def _short(name) -> str:
    """``OASIS_OAS1_0010_MR1:21`` -> ``0010:21`` for figure titles."""
    return str(name).replace("OASIS_OAS1_", "").replace("_MR1", "")


def _save(fig, path: PathLike) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_registration_grid(
    fixed: Sequence[torch.Tensor],
    warped: Sequence[torch.Tensor],
    moving: Sequence[torch.Tensor],
    path: PathLike,
    titles: Optional[Sequence[str]] = None,
) -> Path:
    """The seed's figure: rows fixed, deformed moving, original moving; one column per pair.

    Args:
        fixed: per pair, ``(1, H, W[, D])``.
        warped: per pair, the warped moving image.
        moving: per pair, the moving image.
        path: the PNG to write.
        titles: per-pair column titles.
    """
    n = len(fixed)
    if not (n == len(warped) == len(moving)) or n == 0:
        raise ValueError(
            f"need the same positive number of fixed, warped and moving images, got "
            f"{len(fixed)}, {len(warped)}, {len(moving)}."
        )
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 7.2), squeeze=False)
    for col in range(n):
        for row, (name, images) in enumerate([("fixed", fixed), ("deformed moving", warped), ("moving", moving)]):
            ax = axes[row][col]
            ax.imshow(_plane(images[col]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
        if titles:
            axes[0][col].set_title(titles[col], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_curves(curves: Dict[str, Sequence[float]], path: PathLike, ylabel: str = "training loss") -> Path:
    """One line per run (e.g. per variant): loss against epoch."""
    if not curves:
        raise ValueError("no loss curves to plot.")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), list(values), marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _plane_field(ddf: torch.Tensor) -> np.ndarray:
    """The in-plane components of a ``(nd, H, W[, D])`` field, ``(2, H, W)``."""
    ddf = torch.as_tensor(ddf).detach().float().cpu()
    if ddf.dim() == 4:
        ddf = ddf[:2, ..., ddf.shape[-1] // 2]
    return ddf.numpy()


def plot_deformation_grid(image: torch.Tensor, ddf: torch.Tensor, path: PathLike, step: int = 4) -> Path:
    """Grid lines deformed by the field, over the fixed image.

    Args:
        image: ``(1, H, W[, D])``.
        ddf: ``(spatial_dims, H, W[, D])`` in voxels.
        path: the PNG to write.
        step: grid spacing in voxels.
    """
    field = _plane_field(ddf)
    h, w = field.shape[1:]
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = y + field[0], x + field[1]
    fig, ax = plt.subplots(figsize=(4, 4 * w / max(h, 1)))
    ax.imshow(_plane(image), cmap="gray", vmin=0, vmax=1)
    for i in range(0, h, step):
        ax.plot(px[i], py[i], color="tab:orange", linewidth=0.6)
    for j in range(0, w, step):
        ax.plot(px[:, j], py[:, j], color="tab:orange", linewidth=0.6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title("deformation grid")
    return _save(fig, path)


def plot_jacobian(ddf: torch.Tensor, path: PathLike) -> Path:
    """Jacobian determinant map (centred on 1); voxels with ``J <= 0`` (folding) outlined in black."""
    ddf = torch.as_tensor(ddf).detach().float().cpu()
    det = jacobian_determinant(ddf[None])[0]
    det = det[..., det.shape[-1] // 2] if det.dim() == 3 else det
    det = det.numpy()
    spread = max(float(np.abs(det - 1).max()), 1e-3)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    shown = ax.imshow(det, cmap="RdBu_r", vmin=1 - spread, vmax=1 + spread)
    if (det <= 0).any():
        ax.contour(det <= 0, levels=[0.5], colors="black", linewidths=0.8)
    fig.colorbar(shown, ax=ax, label="det J")
    ax.set_axis_off()
    ax.set_title(f"Jacobian determinant ({100 * (det <= 0).mean():.2f}% folding)")
    return _save(fig, path)


def display(
    network: torch.nn.Module,
    dataset,
    output_dir: PathLike,
    model_path: Optional[PathLike] = None,
    num_pairs: int = 4,
    device: Union[str, torch.device] = "cpu",
) -> List[Path]:
    """Register ``num_pairs`` pairs spread over ``dataset`` and write ``registration_grid.png``,
    ``deformation_grid.png`` and ``jacobian.png`` (the latter two for the first pair).

    Args:
        network: a :class:`~custom.networks.RegistrationNet`.
        dataset: a :class:`~custom.data.PairDataset` (or any dataset of ``moving``/``fixed`` items).
        output_dir: where the PNGs go.
        model_path: weights to load first (``torch.load(weights_only=True)``).
        num_pairs: columns of the grid.
        device: where to run the network.
    """
    from custom.warp import SpatialTransformer

    if model_path is not None:
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"model file {str(model_path)!r} does not exist; train first or pass model_path.")
        network.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    network = network.to(device).eval()
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset has no pairs to display.")
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(num_pairs, n))})
    fixed, warped, moving, ddfs, titles = [], [], [], [], []
    warp = SpatialTransformer()
    with torch.no_grad():
        for i in picks:
            item = dataset[i]
            m, f = torch.as_tensor(item["moving"])[None].float(), torch.as_tensor(item["fixed"])[None].float()
            ddf = network(torch.cat([m, f], 1).to(device)).cpu()
            fixed.append(f[0])
            moving.append(m[0])
            warped.append(warp(m, ddf)[0])
            ddfs.append(ddf[0])
            titles.append(f"{_short(item.get('moving_id', i))}\nto {_short(item.get('fixed_id', ''))}")
    out = Path(output_dir)
    return [
        plot_registration_grid(fixed, warped, moving, out / "registration_grid.png", titles),
        plot_deformation_grid(fixed[0], ddfs[0], out / "deformation_grid.png"),
        plot_jacobian(ddfs[0], out / "jacobian.png"),
    ]
