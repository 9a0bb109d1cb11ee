"""What ran where: software versions and hardware, recorded in every manifest and result file."""

from __future__ import annotations

import os
import platform

import torch
from monai.config.deviceconfig import get_config_values, get_package_version


def software_versions() -> dict:
    """Python's version and those of the libraries that shape the output, the latter as MONAI's config
    report gives them (MONAI's system report holds Python's too, but fails on a Linux without
    /etc/os-release)."""
    monai_config = get_config_values()
    return {
        "python": platform.python_version(),
        "torch": monai_config["Pytorch"],
        "monai": monai_config["MONAI"],
        "numpy": monai_config["Numpy"],
        "nibabel": get_package_version("nibabel"),
    }


def hardware() -> dict:
    """CPU model, core and thread counts, GPU name. By hand: MONAI's system report names no CPU model on
    Linux (platform.processor() is empty there) and counts cores only with psutil, not a dependency."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu}
