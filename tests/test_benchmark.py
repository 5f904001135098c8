import pytest

from custom.benchmark import benchmark


@pytest.mark.slow
def test_benchmark_writes_table(tmp_path):
    out = tmp_path / "bench.md"
    table = benchmark(shape=(32, 32), batch_size=2, repeats=1, variants="both", output=str(out))
    assert "| both | 45,106 |" in table
    assert "monai VoxelMorph (steps=0)" in table and "LNCC (kernel 9)" in table
    assert out.read_text() == table


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"spatial_dims": 2, "shape": (32, 32, 32)}, "shape must have 2 sizes"),  # 3 sizes for 2D
        ({"spatial_dims": 2, "variants": ("tiny",)}, "unknown variants"),  # bad variant
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),  # 1D
    ],
)
def test_benchmark_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark(**kwargs)
