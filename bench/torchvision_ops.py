"""torchvision's own box losses in this process, also where torchvision cannot be installed.

torchvision's wheels on PyPI are built against CUDA torch; with a CPU-only torch their compiled extension (_C:
nms, roi_align, ...) cannot load, and `import torchvision` fails while registering those operators. The box losses
(torchvision.ops.complete_box_iou_loss and its siblings) are plain torch code that never touches _C. So when
`import torchvision` fails, this module takes the wheel that matches the installed torch (torch 2.N pairs with
torchvision 0.(N+15)) from PyPI with `pip download --no-deps` into bench/.cache, unpacks it, and imports
`torchvision.ops` under an empty top-level package: the functions run are torchvision's, unchanged.

    from torchvision_ops import load
    ciou_loss, source = load("complete_box_iou_loss")
"""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Callable

CACHE = Path(__file__).resolve().parent / ".cache"


def matching_version(torch_version: str) -> str:
    """The torchvision release series made for a torch version: torch 2.N.x -> torchvision 0.(N+15).*"""
    major, minor = (int(p) for p in torch_version.split("+")[0].split(".")[:2])
    if major != 2:
        raise RuntimeError(f"no known torchvision series for torch {torch_version}")
    return f"0.{minor + 15}"


def _unpacked(series: str) -> Path:
    folder = CACHE / f"torchvision-{series}"
    if (folder / "torchvision" / "ops" / "ciou_loss.py").exists():
        return folder
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"torchvision-{series}.*-cp{sys.version_info.major}{sys.version_info.minor}-*.whl"))
    if not found:
        print(f"torchvision: downloading the torchvision {series}.* wheel (no dependencies) into {wheels}",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        f"torchvision=={series}.*", "-d", str(wheels)], check=True, stdout=subprocess.DEVNULL)
        found = sorted(wheels.glob(f"torchvision-{series}.*.whl"))
    with zipfile.ZipFile(found[-1]) as z:
        z.extractall(folder)
    return folder


def load(name: str = "complete_box_iou_loss") -> tuple[Callable, str]:
    """torchvision.ops.<name> and a line saying where it came from."""
    import torch

    try:
        import torchvision
        import torchvision.ops as ops

        return getattr(ops, name), f"torchvision {torchvision.__version__} (installed)"
    except Exception:  # noqa: BLE001 - not installed, or its compiled extension does not fit this torch
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
    series = matching_version(torch.__version__)
    folder = _unpacked(series)
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = [str(folder / "torchvision")]
    pkg.__file__ = str(folder / "torchvision" / "__init__.py")
    sys.modules["torchvision"] = pkg
    import torchvision.ops as ops  # noqa: E402 - under the empty top-level package

    version = next((p.name[len("torchvision-"):-len(".dist-info")] for p in folder.glob("torchvision-*.dist-info")),
                   series)
    return getattr(ops, name), (f"torchvision {version} from its PyPI wheel: torchvision.ops.{name} (plain torch "
                                "code) imported without torchvision's compiled extension, which needs CUDA torch")
