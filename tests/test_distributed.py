"""Two-process (gloo, CPU) runs of the bundles' multi-GPU configs through torchrun, as a user launches them."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from custom.bundle_utils import config_files
from custom.data import open_dataset
from custom.demo import make_demo_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = "configs"  # the multi-GPU overlays, layered last
NUM_CASES = 4
SHAPE = (32, 32, 16)

# Test-only probes, added as a third config file: they print what each rank did, nothing else.
TRAIN_PROBE = {
    "+training": [
        "$print(' '.join(['PROBE-TRAIN', str(dist.get_rank()), str(len(@train#dataloader)),"
        " repr(sum(p.double().sum().item() for p in @generator.parameters())),"
        " repr(sum(p.double().sum().item() for p in @surrogate.parameters()))]) + '\\n', end='', flush=True)"
    ]
}
PROTECT_PROBE_MODULE = '''
import torch.distributed as dist
from custom.protect import DatasetProtector


class RankLoggingProtector(DatasetProtector):
    """DatasetProtector that says which rank protects which case."""

    def _perturb_case(self, case):
        # one write per line: the two ranks share the pipe, and print's separate newline write can interleave
        print(f"PROBE-PROTECT {dist.get_rank()} {case.case_id}\\n", end="", flush=True)
        return super()._perturb_case(case)
'''
PROTECT_PROBE = {"dataset_protector#_target_": "voxshield_rank_probe.RankLoggingProtector"}


def torchrun(run_id: str, configs: list[str], *args: str, pythonpath: Path | None = None):
    """2 CPU processes, gloo; the same interpreter as the tests (python -m torch.distributed.run == torchrun)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "LOCAL_RANK", "RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", run_id, "--config_file", repr(configs), *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def test_two_process_training_and_protect(tmp_path):
    data = make_demo_dataset(tmp_path / "data", "flare", num_cases=NUM_CASES, shape=SHAPE)
    ckpt, logs, out = tmp_path / "ckpt", tmp_path / "logs", tmp_path / "protected"
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "train_probe.json").write_text(json.dumps(TRAIN_PROBE))
    (probes / "protect_probe.json").write_text(json.dumps(PROTECT_PROBE))
    (probes / "voxshield_rank_probe.py").write_text(PROTECT_PROBE_MODULE)

    # ---- training: DDP over 2 ranks, checkpoints from rank 0 only ------------------------------
    output = torchrun(
        "training",
        [*config_files("voxshield_flare", "training"), f"{SHARED}/multi_gpu_train.json", str(probes / "train_probe.json")],
        "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--log_dir", str(logs),
        "--epochs", "1", "--patch_size", "[32,32,16]",
    )
    assert sorted(p.name for p in ckpt.iterdir()) == ["generator.pt", "surrogate.pt", "training_config.json"]
    for name in ("generator.pt", "surrogate.pt"):
        assert len(re.findall(rf"saved final checkpoint: \S*{re.escape(name)}", output)) == 1, output[-3000:]
    probe = {int(rank): rest for rank, *rest in re.findall(r"PROBE-TRAIN (\d) (\d+) (\S+) (\S+)", output)}
    assert sorted(probe) == [0, 1], output[-3000:]
    # DistributedSampler: each rank sees half the cases (2 of 4 -> one batch of 2, not two batches)
    assert probe[0][0] == probe[1][0] == "1"
    # DDP: different data on each rank, yet bit-identical weights after the step (gradients all-reduced)
    assert probe[0][1:] == probe[1][1:]

    parser = ConfigParser()
    parser.read_config(config_files("voxshield_flare", "training"))
    parser["dataset_dir"] = str(data)
    generator = parser.get_parsed_content("generator_def")
    assert type(generator) is UNet
    state = torch.load(ckpt / "generator.pt", map_location="cpu", weights_only=True)
    generator.load_state_dict(state, strict=True)  # flat state_dict: no "module." prefix from DDP
    assert repr(sum(p.double().sum().item() for p in generator.parameters())) == probe[0][1]

    # ---- protect: cases sharded across the 2 ranks, manifest from rank 0 ------------------------
    output = torchrun(
        "protect",
        [*config_files("voxshield_flare", "protect"), f"{SHARED}/multi_gpu_protect.json", str(probes / "protect_probe.json")],
        "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(out),
        "--window_size", "[32,32,16]",
        pythonpath=probes,
    )
    case_ids = sorted(case.case_id for case in open_dataset(data).cases)
    assert len(case_ids) == NUM_CASES
    done = re.findall(r"PROBE-PROTECT (\d) (\S+)", output)
    assert sorted(case for _, case in done) == case_ids, output[-3000:]  # every case protected exactly once
    by_rank = {rank: {case for r, case in done if r == rank} for rank in ("0", "1")}
    assert len(by_rank["0"]) == len(by_rank["1"]) == NUM_CASES // 2  # and both ranks did half of them

    manifest = json.loads((out / "voxshield_manifest.json").read_text())
    assert sorted(record["case_id"] for record in manifest["cases"]) == case_ids
    for record in manifest["cases"]:
        assert record["protected"]
        for name, digest in record["files"].items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert not (out / ".voxshield_progress").exists()
