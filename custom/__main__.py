"""``python -m custom <command>``: see :mod:`custom.cli`."""

from custom.cli import main

if __name__ == "__main__":
    main()
