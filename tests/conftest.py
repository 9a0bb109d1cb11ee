"""Shared fixtures: tiny demo datasets, a random generator checkpoint, and running bundles as a user does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from custom.bundle_utils import config_files
from custom.demo import make_demo_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
LA_MRI = REPO_ROOT.parent / "shared" / "data" / "la_mri"
EPS = 4 / 255


def generator_net(channels: int) -> UNet:
    """The configs' generator_def (configs/train.json) for ``channels`` image channels."""
    parser = ConfigParser()
    parser.read_config(config_files("voxshield_flare", "training"))
    parser["generator_def#in_channels"] = parser["generator_def#out_channels"] = channels
    return parser.get_parsed_content("generator_def")


def run_bundle(*args: str, bundle: str = "voxshield_flare") -> subprocess.CompletedProcess:
    """`python -m monai.bundle run WORKFLOW ...` from the repository root, exactly as the README says:
    the bundle's bundle.json, then the shared configs of that workflow (bundle_utils.config_files)."""
    paths = [Path(path).relative_to(REPO_ROOT).as_posix() for path in config_files(bundle, args[0])]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    command = [sys.executable, "-m", "monai.bundle", "run", args[0], "--config_file", repr(paths), *args[1:]]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def flare_data(tmp_path):
    return make_demo_dataset(tmp_path / "flare", "flare", num_cases=3, shape=(32, 32, 16))


@pytest.fixture
def brats_data(tmp_path):
    return make_demo_dataset(tmp_path / "brats", "brats", num_cases=2, shape=(32, 32, 16))


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory):
    """Untrained generators (1 and 4 channels): protect's guarantees must hold for any weights."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for channels in (1, 4):
        torch.manual_seed(channels)
        net = generator_net(channels)
        with torch.no_grad():  # a large final bias + weights so tanh saturates: the bound is exercised
            for parameter in net.parameters():
                parameter.mul_(4.0)
        paths[channels] = folder / f"generator_{channels}.pt"
        torch.save(net.state_dict(), paths[channels])
    return paths
