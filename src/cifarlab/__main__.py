"""``python -m cifarlab``: the ``cifarlab`` command."""

from cifarlab.cli import main

if __name__ == "__main__":
    main()
