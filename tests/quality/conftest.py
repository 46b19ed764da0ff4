import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared beside the checkout


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
