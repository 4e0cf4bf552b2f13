"""``python -m napari_medfm.cli`` == ``medfm``."""

import sys

from . import main

sys.exit(main())
