"""``python -m diffusers_retina.cli ...`` (and ``accelerate launch -m diffusers_retina.cli ...``)."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
