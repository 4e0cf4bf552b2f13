"""``python -m napari_medfm`` == ``medfm``."""

import sys

from .cli import main

sys.exit(main())
