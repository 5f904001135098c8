import pytest

from custom.benchmark import benchmark, main


@pytest.mark.slow
def test_benchmark_prints_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    args = ["--shape", "32", "32", "--batch-size", "2", "--repeats", "1", "--variants", "both", "--output", str(out)]
    table = main(args)
    assert "| both | 45,106 |" in table
    assert "monai VoxelMorph (steps=0)" in table and "LNCC (kernel 9)" in table
    assert out.read_text() == table and table in capsys.readouterr().out


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
