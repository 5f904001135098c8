"""The one check of ``spatial_dims`` that every layer uses (networks, losses, data, refinement, tools), and the slabs
that local computations on large grids run through."""

from typing import Iterator, Tuple

__all__ = ["check_spatial_dims", "slabs"]


def slabs(size: int, step: int, halo: int) -> Iterator[Tuple[int, int, int, int]]:
    """Cut ``range(size)`` into slabs of ``step`` for a computation that looks ``halo`` voxels beyond each: yields
    ``(first, last, low, high)``, the slab ``[first, last)`` and the range ``[low, high)`` to compute it from (its
    result for the slab is ``[first - low, last - low)`` of that range's). Exact for any local computation.
    """
    for first in range(0, size, max(1, step)):
        last = min(size, first + max(1, step))
        yield first, last, max(0, first - halo), min(size, last + halo)


def check_spatial_dims(spatial_dims: int) -> int:
    """Validate ``spatial_dims``.

    Args:
        spatial_dims: the number of spatial dimensions.

    Returns:
        ``spatial_dims`` as an ``int``.

    Raises:
        ValueError: unless it is 2 or 3.
    """
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    return int(spatial_dims)
