"""The one check of ``spatial_dims`` that every layer uses (networks, losses, data, refinement, tools)."""

__all__ = ["check_spatial_dims"]


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
