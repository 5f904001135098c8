import pytest

from custom.benchmark import benchmark


@pytest.mark.slow
def test_benchmark_writes_table(tmp_path):
    out = tmp_path / "bench.md"
    table = benchmark(shape=(32, 32), batch_size=2, repeats=1, variants="both", output=str(out), threads=1)
    assert "| both | 45,106 |" in table
    assert "monai VoxelMorph (steps=0)" in table and "LNCC (kernel 9)" in table
    both = next(line for line in table.splitlines() if line.startswith("| both |")).split("|")
    step_s, per_hour = float(both[5]), float(both[6].replace(",", ""))
    assert per_hour == pytest.approx(3600 / step_s, rel=0.01, abs=1)  # the steps per hour a step's time allows
    assert out.read_text() == table


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"spatial_dims": 2, "shape": (32, 32, 32)}, "shape must have 2 sizes"),  # 3 sizes for 2D
        ({"spatial_dims": 2, "variants": ("tiny",)}, "unknown variants"),  # bad variant
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),  # 1D
        ({"spatial_dims": 3, "train_dataset": "data"}, "train_dataset times 2D training"),  # a 3D training figure
        ({"train_dataset": "data", "train_epochs": 1}, "train_epochs >= 2"),  # no epoch after the warm-up
    ],
)
def test_benchmark_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark(**kwargs)


@pytest.mark.slow
def test_training_epochs_table(tmp_path):
    """The training-epoch figure on tiny demo data: ours and MONAI's VoxelMorph, each epoch split into its training
    iterations and the rest."""
    import re

    from custom.benchmark import training_epochs
    from custom.data import make_demo

    make_demo(tmp_path / "demo", num_subjects=3, shape=(24, 28, 20))
    table = training_epochs(str(tmp_path / "demo"), epochs=2, threads=1)
    rows = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| MONAI")]
    assert len(rows) == 2 and rows[1].endswith("| 1.00x |")
    for row in rows:
        iterations, epoch, steps, rest = (float(v) for v in re.findall(r"\| ([\d.]+)", row)[:4])
        assert iterations >= 1 and 0 < steps < epoch and rest > 0  # the epoch's validation is counted in it
