import json
import os
from pathlib import Path

import pytest



def _shared() -> Path:
    """../shared/data beside the checkout (or beside a folder above it, for a worktree), or $LOSSD_SHARED_DATA."""
    if os.environ.get("LOSSD_SHARED_DATA"):
        return Path(os.environ["LOSSD_SHARED_DATA"])
    for up in Path(__file__).resolve().parents:
        if (up / "shared" / "data").is_dir():
            return up / "shared" / "data"
    return Path(__file__).resolve().parents[3] / "shared" / "data"


SHARED = _shared()


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    d = SHARED / "coco-val2014-100"
    assert d.exists(), f"the shared test data is missing: {d}"
    return d


@pytest.fixture(scope="session")
def voc_dir() -> Path:
    return SHARED / "deepforest-voc"


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
