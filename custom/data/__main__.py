"""``python -m custom.data make-demo DIR``: write the synthetic demo dataset."""

import fire

from custom.data.demo import make_demo


def _make_demo(directory: str, num_subjects: int = 12, shape=(80, 96, 112), seed: int = 0) -> str:
    """Write the synthetic demo dataset (neurite-OASIS layout) to DIRECTORY, which must be new or empty."""
    return str(make_demo(directory, num_subjects, tuple(shape), seed))


if __name__ == "__main__":
    fire.Fire({"make-demo": _make_demo})
