"""The checks of a user's input files (custom/input_checks.py): the memory bound (the refusals themselves run
through RegistrationPairs in test_inference and end to end in test_bundle and test_cli)."""

import pytest

from custom.input_checks import BASE_GIB, BYTES_PER_VOXEL, estimate_memory_gib


@pytest.mark.parametrize(
    "shape,low,high",
    [
        ((160, 192), 0.6, 0.61),  # a 2D slice: the fixed cost only
        ((160, 192, 224), 1.9, 2.1),  # a neurite-OASIS volume: about 2 GiB
        ((320, 320, 352), 7.5, 8.0),  # the largest volume of the documented 8 GiB
    ],
)
def test_memory_estimate(shape, low, high):
    assert low <= estimate_memory_gib(shape) <= high


def test_the_documented_8_gib_bound():
    voxels = (8 - BASE_GIB) * 2**30 / BYTES_PER_VOXEL
    assert 35e6 < voxels < 37e6  # "with 8 GiB a pair of up to about 36 million voxels fits"
