"""What the benchmark scripts share: where the real corpus is, and the corpus' report texts."""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run from a checkout, not an install
    sys.path.insert(0, str(ROOT))


def corpus_dir() -> Path:
    """The real test corpus: ``$MEDFM_TEST_DATA`` or ``../shared/data/real`` beside the checkout."""
    env = os.environ.get("MEDFM_TEST_DATA")
    return Path(env).expanduser() if env else ROOT.parent / "shared" / "data" / "real"


def iu_report_texts(labels: tuple[str, ...] | None = None) -> list[str]:
    """The non-empty ``AbstractText`` sections of the corpus' IU X-ray reports (``labels``:
    only these sections, e.g. ``("FINDINGS",)``); an empty list when the corpus is absent."""
    folder = corpus_dir() / "cxr" / "reports_iu_xray"
    texts: list[str] = []
    for f in sorted(folder.glob("*.xml")) if folder.is_dir() else []:
        texts += [n.text.strip() for n in ET.parse(f).getroot().iter("AbstractText")
                  if n.text and n.text.strip() and (labels is None or n.get("Label") in labels)]
    return texts
