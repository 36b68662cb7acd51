"""``python -m advtrain.eval --help``: the robustness evaluation command (see :mod:`advtrain.eval._cli`)."""

import sys

from advtrain.eval._cli import main

if __name__ == "__main__":
    sys.exit(main())
