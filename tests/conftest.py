"""Shared fixtures: tiny demo datasets, a random generator checkpoint, and running bundles as a user
does (a fresh `python -m monai.bundle` process) or through the same entry in this process."""

import contextlib
import logging
import os
import random
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import fire
import monai.bundle.__main__ as monai_bundle_main
import monai.utils.misc
import numpy as np
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


def bundle_command(*args: str, bundle: str = "voxshield_flare") -> list[str]:
    """What follows `python -m monai.bundle` in the README to run workflow ``args[0]`` of ``bundle`` with the
    overrides ``args[1:]``: the bundle's bundle.json, then the shared configs of that workflow
    (bundle_utils.config_files), as paths relative to the repository root."""
    paths = [Path(path).relative_to(REPO_ROOT).as_posix() for path in config_files(bundle, args[0])]
    return ["run", args[0], "--config_file", repr(paths), *args[1:]]


def run_bundle(*args: str, bundle: str = "voxshield_flare") -> subprocess.CompletedProcess:
    """`python -m monai.bundle run WORKFLOW ...` from the repository root in a fresh interpreter, exactly as
    the README says (no PYTHONPATH). One thread unless OMP_NUM_THREADS says otherwise: with two, runs
    took four times longer while other jobs held the machine's two cores."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "monai.bundle", *bundle_command(*args, bundle=bundle)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_in_process(*args: str, bundle: str = "voxshield_flare") -> subprocess.CompletedProcess:
    """run_bundle's command in this process (see monai_bundle_in_process): the same workflow, configs and
    overrides without the seconds a fresh interpreter spends importing torch and MONAI."""
    return monai_bundle_in_process(*bundle_command(*args, bundle=bundle))


def monai_bundle_in_process(*args: str) -> subprocess.CompletedProcess:
    """
    `python -m monai.bundle ARGS` from the repository root, in this process. That module's __main__ is
    `fire.Fire()` over the monai.bundle.scripts functions it imports, so firing the module with ARGS
    parses every `--key value` exactly as the command line does. Returns what the process would have
    given: returncode (0; an uncaught exception's 1, its traceback on stderr; a SystemExit's code) and
    the text written to stdout and stderr. Output is taken at the file-descriptor level and every
    logging handler writing to this process's stdout or stderr is pointed there for the run, since
    MONAI's loggers hold the stream that was sys.stdout when they were made. Global state the run
    changes is put back (_process_state). An input error cannot be told from any other exception here:
    the configs' one-line report (bundle_utils.brief_input_errors) ends the process, so tests of that
    line and its exit status run the bundle as a subprocess (run_bundle).
    """
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        with _process_state(), _output_to(stdout, stderr):
            try:
                fire.Fire(monai_bundle_main, command=list(args))
                returncode = 0
            except SystemExit as stop:
                returncode = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            except Exception:
                traceback.print_exc()  # as the interpreter reports an uncaught exception before exiting 1
                returncode = 1
        stdout.seek(0), stderr.seek(0)
        return subprocess.CompletedProcess(["monai.bundle", *args], returncode, stdout.read().decode(errors="replace"),
                                           stderr.read().decode(errors="replace"))


@contextlib.contextmanager
def _output_to(stdout, stderr):
    """File descriptors 1 and 2, sys.stdout / sys.stderr and the logging handlers bound to them write
    to the files ``stdout`` and ``stderr`` inside the block; all of them are put back after it."""
    streams = {1: sys.stdout, 2: sys.stderr}
    originals = {sys.stdout: 1, sys.stderr: 2, sys.__stdout__: 1, sys.__stderr__: 2}
    for stream in streams.values():
        stream.flush()
    saved = {fd: os.dup(fd) for fd in streams}
    # left open: a logger first made during the run keeps its stream, which then writes to the restored fd
    replacements = {fd: open(fd, "w", closefd=False) for fd in streams}
    loggers = [logging.getLogger(), *(item for item in logging.root.manager.loggerDict.values()
                                      if isinstance(item, logging.Logger))]
    rebound = [(handler, handler.stream) for logger in loggers for handler in logger.handlers
               if isinstance(handler, logging.StreamHandler) and handler.stream in originals]
    try:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        sys.stdout, sys.stderr = replacements[1], replacements[2]
        for handler, stream in rebound:
            handler.setStream(replacements[originals[stream]])
        yield
    finally:
        for handler, stream in rebound:
            handler.setStream(stream)
        for fd, replacement in replacements.items():
            replacement.flush()
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        sys.stdout, sys.stderr = streams[1], streams[2]


@contextlib.contextmanager
def _process_state():
    """What a workflow run changes for the rest of its process, restored afterwards: the working directory
    (the repository root during the run, as run_bundle's cwd), sys.excepthook (the configs' initialize
    installs brief_input_errors), torch's thread count (OMP_NUM_THREADS, else 1 during the run, as
    run_bundle's environment sets), the torch, numpy and random generators and MONAI's determinism
    flags (set_determinism in train.json and evaluate.json), and the root logger (the bundle's
    logging.conf replaces its handlers)."""
    cwd, hook, threads = os.getcwd(), sys.excepthook, torch.get_num_threads()
    numpy_state, random_state, seed = np.random.get_state(), random.getstate(), monai.utils.misc._seed
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        os.chdir(REPO_ROOT)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        os.chdir(cwd)
        sys.excepthook = hook
        torch.set_num_threads(threads)
        np.random.set_state(numpy_state)
        random.setstate(random_state)
        monai.utils.misc._seed = seed
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Torch runs every test on one thread unless OMP_NUM_THREADS says otherwise: the machine's two cores
    are shared, and with a thread per core test_protectors took 75 s instead of 3 s while they were busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def wait_policy_put_back():
    """`voxshield protect` sets OMP_WAIT_POLICY in its process (custom/cli.py): a test that runs it here
    must not hand it to the subprocesses of the tests after it."""
    saved = os.environ.get("OMP_WAIT_POLICY")
    yield
    if saved is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = saved


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
