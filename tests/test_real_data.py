"""Train and protect on a few real LGE-MRI cases of ../shared/data/la_mri (2018 Left Atrium challenge),
through monai.bundle's entry in this process (conftest.run_in_process): the fresh-interpreter runs of
the README's commands are test_bundles' and test_bad_input's."""

import json

import nibabel as nib
import numpy as np
import pytest

from checks import assert_protected_copy
from conftest import EPS, LA_MRI, run_in_process

pytestmark = pytest.mark.skipif(
    not (LA_MRI / "dataset.json").is_file(),
    reason=f"real data not found at {LA_MRI} (only CI and the project machines have ../shared/data/la_mri)",
)


@pytest.fixture
def la_subset(tmp_path):
    """Three training and one test case, linked (never copied into the repo, never modified)."""
    meta = json.loads((LA_MRI / "dataset.json").read_text())
    root = tmp_path / "la_subset"
    entries = {"training": meta["training"][:3], "test": meta["test"][:1]}
    for entry in entries["training"] + entries["test"]:
        for key in ("image", "label"):
            link = root / entry[key]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((LA_MRI / entry[key]).resolve())
    subset = {**meta, **entries, "numTraining": 3, "numTest": 1}
    (root / "dataset.json").write_text(json.dumps(subset, indent=1))
    return root


def test_la_mri_train_and_protect(la_subset, tmp_path):
    ckpt, output = tmp_path / "ckpt", tmp_path / "protected"
    trained = run_in_process(
        "training", "--dataset_dir", str(la_subset), "--ckpt_dir", str(ckpt), "--log_dir", str(tmp_path / "logs"),
        "--epochs", "1",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    protected = run_in_process(
        "protect", "--dataset_dir", str(la_subset), "--ckpt_dir", str(ckpt), "--output_dir", str(output),
    )
    assert protected.returncode == 0, protected.stderr[-3000:]
    manifest = assert_protected_copy(la_subset, output, EPS, ct=False)
    assert len(manifest["cases"]) == 4 and manifest["dataset"]["layout"] == "msd"
    for record in manifest["cases"]:
        image = nib.load(output / record["images"][0])
        assert image.get_data_dtype() == np.float32
        assert record["psnr_db_volume"] > 40  # the perturbation is confined to the atrium
        assert 0 < record["fraction_voxels_changed"] <= record["roi_fraction"]


@pytest.mark.parametrize("method, support_dilation", [("umed", 1), ("lsp", 0)])
def test_la_mri_baselines_keep_the_guarantees(method, support_dilation, la_subset, tmp_path):
    """A surrogate-based and a training-free baseline on real volumes (sizes not multiples of 16)."""
    ckpt, output = tmp_path / "ckpt", tmp_path / "protected"
    small = ["--surrogate_def#channels", "[8,16,32,64,128]", "--surrogate_def#num_res_units", "0"]
    trained = run_in_process("training", "--dataset_dir", str(la_subset), "--ckpt_dir", str(ckpt), "--log_dir",
                             str(tmp_path / "logs"), "--epochs", "1", "--method", method, *small)
    assert trained.returncode == 0, trained.stderr[-3000:]
    protected = run_in_process("protect", "--dataset_dir", str(la_subset), "--ckpt_dir", str(ckpt), "--output_dir",
                               str(output), "--method", method, "--pgd_steps", "2", *small)
    assert protected.returncode == 0, protected.stderr[-3000:]
    manifest = assert_protected_copy(la_subset, output, EPS, ct=False, support_dilation=support_dilation)
    assert manifest["method"] == method and len(manifest["cases"]) == 4
    for record in manifest["cases"]:
        assert record["psnr_db_volume"] > 40
