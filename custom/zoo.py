"""
Model-zoo packaging: ``voxshield export`` writes a self-contained MONAI bundle zip.

The zip unpacks to ``<bundle>/`` with LICENSE, configs/ (metadata.json, logging.conf, each workflow's
layers merged into one self-contained file, as model-zoo bundles keep them, and the multi-GPU
overlays), docs/, models/generator.pt (and the training_config.json written beside it, which
protect's manifest quotes), large_files.yml listing the weights with their sha256, and the ``custom``
package copied inside the bundle: from the unpacked folder,

    python -m monai.bundle run protect --config_file configs/protect.json --dataset_dir DATA --output_dir OUT

works with nothing else installed than the requirements (``python -m`` puts the bundle folder on
sys.path, and ``custom.bundle_utils.bundle_root`` then names the bundle folder itself). The zip is
deterministic: sorted entries, fixed timestamps and permissions.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from custom.bundle_utils import TRAINING_RECORD, WORKFLOW_CONFIGS, config_files, shared_configs
from custom.nifti_io import VoxShieldInputError, sha256

CHECKPOINT = "generator.pt"
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
LARGE_FILES = "large_files.yml"


def check_generator(bundle_dir: Path, name: str, checkpoint: Path) -> None:
    """The checkpoint must be a state dict that loads (strictly) into the bundle's generator with the
    channel count its metadata declares; otherwise the exported bundle could not protect anything."""
    from monai.bundle import ConfigParser

    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["inputs"]["image"]["num_channels"]
    parser = ConfigParser()
    parser.read_config(merged_config(name, "protect"))
    parser["generator_def#in_channels"] = channels
    parser["generator_def#out_channels"] = metadata["network_data_format"]["outputs"]["pred"]["num_channels"]
    network = parser.get_parsed_content("generator_def")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as error:
        raise VoxShieldInputError(
            f"{checkpoint}: not a generator state dict for {name} ({channels} channel(s)): "
            f"{str(error).splitlines()[0]}"
        ) from error


def merged_config(name: str, workflow: str) -> dict:
    """The workflow's configs (the bundle's bundle.json, then the shared layers) merged into one
    dict, as ``monai.bundle run`` merges them: an exported bundle ships it as configs/<workflow>.json."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files(config_files(name, workflow))


def large_files_yml(sha256: str, url: str) -> str:
    """large_files.yml in the model zoo's format: `python -m monai.bundle download_large_files
    --bundle_path <bundle>` downloads what is missing and checks the hash of what is there."""
    return (
        "# Weights of this bundle. `python -m monai.bundle download_large_files --bundle_path <bundle>`\n"
        "# fetches a missing file from url and checks the sha256 of every file.\n"
        "large_files:\n"
        f'  - path: "models/{CHECKPOINT}"\n'
        f"    url: {json.dumps(url)}\n"
        f'    hash_val: "{sha256}"\n'
        '    hash_type: "sha256"\n'
    )


def bundle_entries(bundle_dir: Path, name: str, ckpt_dir: Path) -> dict[str, Path | bytes]:
    """Archive name -> source file (or bytes) for the whole bundle."""
    package = Path(__file__).resolve().parent
    entries: dict[str, Path | bytes] = {f"{name}/LICENSE": bundle_dir / "LICENSE"}
    for path in sorted((bundle_dir / "docs").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            entries[f"{name}/{path.relative_to(bundle_dir).as_posix()}"] = path
    for file_name in ("metadata.json", "logging.conf"):
        entries[f"{name}/configs/{file_name}"] = bundle_dir / "configs" / file_name
    # the zoo's layout: each workflow one self-contained file; the multi-GPU overlays layer on them
    for workflow, layers in WORKFLOW_CONFIGS.items():
        entries[f"{name}/configs/{layers[-1]}"] = json.dumps(merged_config(name, workflow), indent=4).encode()
    for overlay in ("multi_gpu_train.json", "multi_gpu_protect.json"):
        entries[f"{name}/configs/{overlay}"] = shared_configs() / overlay
    for path in sorted(package.glob("*.py")):  # the package's modules, not an installed copy's bundles/
        entries[f"{name}/custom/{path.name}"] = path
    checkpoint = ckpt_dir / CHECKPOINT
    entries[f"{name}/models/{CHECKPOINT}"] = checkpoint
    if (ckpt_dir / TRAINING_RECORD).is_file():
        entries[f"{name}/models/{TRAINING_RECORD}"] = ckpt_dir / TRAINING_RECORD
    return entries


def export_bundle(
    bundle_dir: Path, name: str, ckpt_dir: Path, output: Path | None = None, url: str = "", overwrite: bool = False
) -> Path:
    """
    Write the zoo zip of bundle ``name`` (configs from ``bundle_dir``) with the generator in ``ckpt_dir``.

    Args:
        bundle_dir: the bundle folder (configs/, docs/, LICENSE).
        name: voxshield_flare or voxshield_brats; the zip's top folder.
        ckpt_dir: holds generator.pt (and optionally training_config.json).
        output: the zip path; default voxshield_<bundle>-<version>.zip in the working directory.
        url: where generator.pt will be published (large_files.yml); may be filled in later.
        overwrite: replace an existing zip.

    Returns:
        the path of the zip.
    """
    checkpoint = ckpt_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise VoxShieldInputError(f"{checkpoint}: generator checkpoint not found; train first (voxshield train).")
    version = json.loads((bundle_dir / "configs" / "metadata.json").read_text())["version"]
    output = Path(output) if output is not None else Path(f"{name}-{version}.zip")
    if output.exists() and not overwrite:
        raise VoxShieldInputError(f"{output}: exists; pass --overwrite true to replace it.")
    check_generator(bundle_dir, name, checkpoint)

    entries = bundle_entries(bundle_dir, name, ckpt_dir)
    entries[f"{name}/{LARGE_FILES}"] = large_files_yml(sha256(checkpoint), url).encode()
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for folder in sorted({entry.rsplit("/", 1)[0] + "/" for entry in entries} | {f"{name}/"}):
                info = zipfile.ZipInfo(folder, ZIP_TIMESTAMP)
                info.external_attr = (0o40755 << 16) | 0x10
                archive.writestr(info, b"")
            for entry in sorted(entries):
                source = entries[entry]
                info = zipfile.ZipInfo(entry, ZIP_TIMESTAMP)
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, source if isinstance(source, bytes) else source.read_bytes())
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return output
