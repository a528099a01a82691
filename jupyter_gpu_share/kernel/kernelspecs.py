"""Kernelspecs of the user side: the shipped ``gpu-share`` one, and one per class fetched."""

from __future__ import annotations

import json
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir

SHIPPED_SPEC = Path(__file__).parent / "kernelspec" / "kernel.json"


def class_kernelspec(class_name: str, gpu_model: str | None) -> dict:
    """The kernelspec that starts a kernel on a class's pool, charged to the class."""
    spec = json.loads(SHIPPED_SPEC.read_text())
    spec["display_name"] = f"Python 3 ({class_name} class GPU)"
    config = {"class_name": class_name}
    if gpu_model:
        config["gpu_model"] = gpu_model
    spec["metadata"]["kernel_provisioner"]["config"] = config
    spec["metadata"]["gpu_share"] = {"remote": True, "class": class_name}
    return spec


def install_class_kernelspec(class_name: str, kernel_name: str, gpu_model: str | None) -> Path:
    """Write a class's kernelspec to the user's Jupyter data dir; return its folder."""
    folder = Path(jupyter_data_dir()) / "kernels" / kernel_name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(
        json.dumps(class_kernelspec(class_name, gpu_model), indent=1)
    )
    return folder
