"""Report tables from synthetic results.json files, and the figures of a hand-made protected copy."""

import json
import shutil

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, run_bundle
from custom import figures, report
from custom.demo import make_demo_dataset
from custom.nifti_io import VoxShieldInputError
from custom.protection_views import countermeasure_matrix
from custom.results import CLEAN, FULL, Variant, collect_results, summarise

CT_WINDOW = (-175.0, 250.0)
CHANGE_HU = 6


def results_file(folder, method="clean", victim="unet", dataset="FLARE21", dice=0.8, hd95=5.0, psnr=None,
                 ssim=None, training=None, test_cases=3, epochs=100, eps=4 / 255, fitted=True, mask_roi=True, seed=0,
                 countermeasure=None, recipe_name=None, best_dice=None, parameters=None, pgd_at_eps=4 / 255):
    """A results.json as custom.evaluate writes it, with only the fields the report reads filled in
    (``fitted=False``: a training-free method, no checkpoint; ``parameters``: the method's own, recorded
    beside the bound's; ``pgd_at_eps``: the bound of countermeasure pgd_at)."""
    protection = None if method == "clean" else {
        "method": method,
        "parameters": {"eps": eps, "roi_dilation": 0, "squash": "tanh", "mask_roi": mask_roi, **(parameters or {})},
        "fitted": {"checkpoint": "generator.pt", "sha256": "0" * 64, "training": training} if fitted else None,
    }
    content = {
        "format": "voxshield-evaluation/1",
        "run": {"victim": victim, "train_data": "/data/train", "test_data": "/data/test", "dataset_name": dataset,
                "method": method, "train_cases": 5, "test_cases": [f"case_{i}" for i in range(test_cases)]},
        "protection": protection,
        "recipe": {"victim": victim, "epochs": epochs, "iterations": 4 * epochs, "augmentation": False, "seed": seed,
                   "countermeasure": countermeasure, **({"name": recipe_name} if recipe_name else {}),
                   # as evaluate records them: settings for the countermeasures that have some, else null
                   "countermeasure_settings": {
                       "resample": {"spacing_mm": [1.5, 1.5, 1.5]},
                       "pgd_at": {"eps": pgd_at_eps, "steps": 3, "step_size": pgd_at_eps / 2},
                   }.get(countermeasure)},
        "metrics": {"aggregate": {"regions": {}, "mean_dice": dice, "mean_hd95_mm": hd95,
                                  "empty_prediction_cases": 0, "cases": test_cases}, "cases": []},
        "imperceptibility": None if psnr is None else {"aggregate": {
            "psnr_db_volume": psnr, "psnr_db_roi": None, "ssim_3d_volume": ssim, "ssim_3d_roi": None,
            "fraction_voxels_changed": 0.1}, "cases": []},
        "software": {}, "hardware": {}, "wall_time_s": {"train": 1.0, "evaluate": 1.0, "total": 2.0},
    }
    if best_dice is not None:
        content["metrics_best_on_protected_validation"] = {"epoch": 3, "aggregate": {"mean_dice": best_dice}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(content))
    return folder / "results.json"


def full(spd=0.05, isc=0.2):
    return {"lambda_spd": spd, "lambda_isc": isc, "isc_normalisation": "relative", "epochs": 50}


@pytest.fixture
def results_dir(tmp_path):
    root = tmp_path / "runs"
    results_file(root / "clean_unet", dice=0.80, hd95=5.0)
    results_file(root / "vox_unet_seed0", "voxshield", dice=0.10, hd95=40.0, psnr=44.0, ssim=0.99, training=full())
    results_file(root / "vox_unet_seed1", "voxshield", dice=0.20, hd95=30.0, psnr=46.0, ssim=0.97, training=full())
    results_file(root / "no_spd", "voxshield", dice=0.50, hd95=12.0, psnr=45.0, ssim=0.98, training=full(spd=0))
    results_file(root / "no_isc", "voxshield", dice=0.30, hd95=20.0, psnr=43.0, ssim=0.96, training=full(isc=0.0))
    results_file(root / "clean_unetr", victim="unetr", dice=0.70, hd95=8.0, epochs=50)
    results_file(root / "vox_unetr", "voxshield", victim="unetr", dice=0.25, hd95=35.0, psnr=44.0, ssim=0.99,
                 training=None, epochs=50)
    return root


def table_lines(markdown: str, title_start: str) -> list[list[str]]:
    """The lines of one Markdown table (header, separator, rows), each as its list of cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title_start}"))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def markdown_rows(markdown: str, title_start: str) -> dict[str, dict[str, str]]:
    """The rows of one Markdown table, as {first cell: {header: cell}}."""
    table = table_lines(markdown, title_start)
    headers = table[0]
    return {row[0]: dict(zip(headers, row)) for row in table[2:]}


def test_tables(results_dir, tmp_path):
    results = collect_results([results_dir, results_dir / "clean_unet" / "results.json"])
    assert len(results) == 7  # a file named twice counts once
    markdown = report.tables(results)

    table1 = markdown_rows(markdown, "Table 1")
    assert list(table1) == ["clean", "voxshield"]
    assert table1["clean"]["FLARE21 DSC (%)"] == "80.00"
    assert table1["clean"]["FLARE21 PSNR (dB)"] == "n/a"
    # two seeds of the full method with the UNet victim; ablations and the UNETR victim stay out
    assert table1["voxshield"]["FLARE21 DSC (%)"] == "15.00 (n=2)"
    assert table1["voxshield"]["FLARE21 HD95 (mm)"] == "35.00 (n=2)"
    assert table1["voxshield"]["FLARE21 PSNR (dB)"] == "45.00 (n=2)"
    assert table1["voxshield"]["FLARE21 SSIM"] == "0.9800 (n=2)"

    table2 = markdown_rows(markdown, "Table 2")
    assert list(table2) == ["unet", "unetr"]
    assert table2["unetr"]["FLARE21 clean DSC (%)"] == "70.00"
    assert table2["unetr"]["FLARE21 voxshield DSC (%)"] == "25.00"  # no training record: the full method
    assert table2["unet"]["FLARE21 voxshield HD95 (mm)"] == "35.00 (n=2)"
    assert list(table2["unet"])[1:] == ["FLARE21 clean DSC (%)", "FLARE21 clean HD95 (mm)",
                                        "FLARE21 voxshield DSC (%)", "FLARE21 voxshield HD95 (mm)"]

    table3 = markdown_rows(markdown, "Table 3")
    assert list(table3) == ["clean (reference)", "full", "w/o L_SPD", "w/o L_ISC"]
    assert table3["w/o L_SPD"]["FLARE21 DSC (%)"] == "50.00"
    assert table3["w/o L_ISC"]["FLARE21 HD95 (mm)"] == "20.00"
    assert table3["full"]["FLARE21 SSIM"] == "0.9800 (n=2)"
    assert "3 clean held-out cases" in markdown and "100 epochs (400 iterations), augmentation off" in markdown

    written = report.write_report(results_dir, tmp_path / "out")
    assert (tmp_path / "out" / "tables.md").read_text() == markdown
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == written and len(saved["sources"]) == 7
    row = next(r for r in saved["tables"]["table1"]["rows"] if r["method"] == "voxshield")
    assert row["dataset"] == "FLARE21" and row["results"] == 2
    assert row["dsc_percent"] == {"mean": pytest.approx(15.0), "n": 2, "results": 2}
    unetr = [r for r in saved["tables"]["table2"]["rows"] if r["victim"] == "unetr"]
    assert [(r["method"], r["hd95_mm"]["mean"]) for r in unetr] == [("clean", 8.0), ("voxshield", 35.0)]


def test_tables_only_with_rows(tmp_path):
    results = collect_results(results_file(tmp_path / "a", victim="segresnet"))
    markdown = report.tables(results)
    assert "Table 1" not in markdown and "Table 3" not in markdown  # no UNet victim, no ablation
    assert markdown_rows(markdown, "Table 2")["segresnet"]["FLARE21 clean DSC (%)"] == "80.00"


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable results file"),
    (json.dumps({"format": "voxshield-manifest/1"}), "is not 'voxshield-evaluation/1'"),
    (json.dumps({"format": "voxshield-evaluation/1", "run": {}}), "incomplete results file"),
])
def test_bad_results_file(tmp_path, content, message):
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content)
    with pytest.raises(VoxShieldInputError, match=message) as caught:
        collect_results([tmp_path])
    assert str(bad) in str(caught.value)
    with pytest.raises(VoxShieldInputError, match="not found"):
        collect_results(tmp_path / "missing")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A 2-case FLARE demo and a 'protected' copy: +-6 HU inside the label, the sign alternating
    between axial slices (an inter-slice flicker)."""
    root = tmp_path_factory.mktemp("figures")
    clean = make_demo_dataset(root / "clean", "flare", num_cases=2, shape=(32, 32, 16))
    protected = root / "protected"
    shutil.copytree(clean, protected)
    cases = []
    for label_path in sorted((clean / "TrainingMask").glob("*.nii.gz")):
        case_id = label_path.name[: -len(".nii.gz")]
        image_name, label_name = f"TrainingImg/{case_id}_0000.nii.gz", f"TrainingMask/{label_path.name}"
        image = nib.load(clean / image_name)
        stored = np.asanyarray(image.dataobj)
        assert stored.dtype == np.int16
        signs = np.where(np.arange(stored.shape[2]) % 2 == 0, 1, -1).astype(np.int16)
        change = (np.asanyarray(nib.load(label_path).dataobj) > 0) * signs * CHANGE_HU
        changed = nib.Nifti1Image((stored + change).astype(np.int16), image.affine, image.header)
        nib.save(changed, protected / image_name)
        cases.append({"case_id": case_id, "images": [image_name], "label": label_name})
    (protected / "voxshield_manifest.json").write_text(json.dumps({"cases": cases}))
    return clean, protected, cases[1]


def hounsfield(path):
    return np.asanyarray(nib.load(path).dataobj).astype(np.float64)


def test_perturbation_slices(datasets):
    clean, protected, case = datasets
    indices, deltas = figures.perturbation_slices(clean, protected, case["case_id"], num_slices=4)
    label = np.asanyarray(nib.load(clean / case["label"]).dataobj) > 0
    centre = int(round(np.nonzero(label)[2].mean()))
    assert len(indices) == 4 and indices == list(range(indices[0], indices[0] + 4)) and centre in indices
    # expected independently: window both volumes to [-175, 250] HU, divide by the width 425 HU
    before, after = (np.clip(hounsfield(folder / case["images"][0]), *CT_WINDOW) for folder in (clean, protected))
    expected = np.moveaxis(((after - before) / (CT_WINDOW[1] - CT_WINDOW[0]))[..., indices], -1, 0)
    np.testing.assert_allclose(deltas, expected, atol=1e-6)
    assert np.isclose(np.abs(deltas).max(), CHANGE_HU / 425, atol=1e-6)
    assert (deltas[0] * deltas[1] <= 0).all() and (deltas[0] * deltas[1] < 0).any()  # the sign flickers
    assert not deltas[~np.moveaxis(label[..., indices], -1, 0)].any()  # nothing outside the label


def test_figures(datasets, tmp_path):
    clean, protected, case = datasets
    perturbation = figures.perturbation_figure(clean, protected, case["case_id"], tmp_path / "a" / "fig3.png",
                                               num_slices=3)
    comparison = figures.comparison_figure(clean, protected, None, tmp_path / "cmp.png", amplification=30)
    for path in (perturbation, comparison):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and 300 <= pixels.shape[0] <= 1000 and 600 <= pixels.shape[1] <= 2000
        assert pixels[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(VoxShieldInputError, match=f"{protected}: no case 'nope'"):
        figures.comparison_figure(clean, protected, "nope", tmp_path / "x.png")
    with pytest.raises(VoxShieldInputError, match="voxshield_manifest.json"):
        figures.perturbation_figure(clean, clean, None, tmp_path / "y.png")


def test_report_bundle(results_dir, datasets, tmp_path):
    clean, protected, _ = datasets
    output = tmp_path / "report"
    ran = run_bundle(
        "report", "--results", repr([str(results_dir / "clean_unet"), str(results_dir / "no_spd" / "results.json")]),
        "--output_dir", str(output), "--clean_dir", str(clean), "--protected_dir", str(protected),
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert sorted(path.name for path in output.iterdir()) == ["comparison.png", "perturbation.png", "report.json",
                                                             "tables.md"]
    saved = json.loads((output / "report.json").read_text())
    assert [row["variant"] for row in saved["tables"]["table3"]["rows"]] == ["clean (reference)", "w/o L_SPD"]

    bad = run_bundle("report", "--results", str(tmp_path / "none"), "--output_dir", str(output), bundle="voxshield_brats")
    assert bad.returncode != 0
    assert f"voxshield: error: {tmp_path / 'none'}: results file or folder not found" in bad.stderr


def test_other_settings_leave_the_paper_tables_for_table_4(tmp_path):
    root = tmp_path / "runs"
    results_file(root / "clean", dice=0.80)
    defaults = {**full(), "eps": 4 / 255, "roi_dilation": 0, "squash": "tanh", "mask_roi": True,
                "surrogate_steps": 1, "generator_steps": 1}
    results_file(root / "paper", "voxshield", dice=0.60, training=defaults)
    results_file(root / "wide", "voxshield", dice=0.40, training={**defaults, "eps": 16 / 255, "roi_dilation": 2})
    results_file(root / "weak", "voxshield", dice=0.30, training={**full(spd=0), "surrogate_steps": 0})
    results_file(root / "authors", "voxshield", dice=0.50, training={**defaults, "surrogate_batches_per_epoch": 10})
    results_file(root / "authors_long", "voxshield", dice=0.20,
                 training={**defaults, "surrogate_batches_per_epoch": 10, "epochs": 100})
    results_file(root / "eot", "voxshield", dice=0.10, training={**defaults, "fit_augmentation": True})
    markdown = report.tables(collect_results(root))

    assert markdown_rows(markdown, "Table 1")["voxshield"]["FLARE21 DSC (%)"] == "60.00"  # the default run alone
    assert list(markdown_rows(markdown, "Table 3")) == ["clean (reference)", "full"]
    table4 = markdown_rows(markdown, "Table 4")
    assert list(table4) == ["clean (reference)", "voxshield: full; eps 0.06275, roi_dilation 2, 50 epochs",
                            "voxshield: full; fit_augmentation True, 50 epochs",
                            "voxshield: full; surrogate_batches_per_epoch 10, 100 epochs",
                            "voxshield: full; surrogate_batches_per_epoch 10, 50 epochs",
                            "voxshield: w/o L_SPD; surrogate_steps 0, 50 epochs"]
    assert table4["voxshield: full; surrogate_batches_per_epoch 10, 50 epochs"]["FLARE21 DSC (%)"] == "50.00"
    assert table4["voxshield: full; surrogate_batches_per_epoch 10, 100 epochs"]["FLARE21 DSC (%)"] == "20.00"
    assert table4["voxshield: full; eps 0.06275, roi_dilation 2, 50 epochs"]["FLARE21 DSC (%)"] == "40.00"
    assert table4["voxshield: w/o L_SPD; surrogate_steps 0, 50 epochs"]["FLARE21 DSC (%)"] == "30.00"
    assert table4["voxshield: full; fit_augmentation True, 50 epochs"]["FLARE21 DSC (%)"] == "10.00"
    assert "defaults: eps 0.01569, roi_dilation 0, squash tanh" in markdown and "fit_augmentation False" in markdown


def test_countermeasure_matrix(tmp_path):
    """Each cell: the victim's DSC over the clean victim's under the same countermeasure; countermeasure
    runs stay out of Tables 1-4."""
    root = tmp_path / "runs"
    results_file(root / "clean", dice=0.80)
    results_file(root / "clean_z", dice=0.60, countermeasure="z_smooth")
    results_file(root / "clean_2d", victim="slice2d", dice=0.50)
    results_file(root / "vox", "voxshield", dice=0.40, training=full())
    results_file(root / "vox_z0", "voxshield", dice=0.45, training=full(), countermeasure="z_smooth")
    results_file(root / "vox_z1", "voxshield", dice=0.57, training=full(), countermeasure="z_smooth", seed=1)
    results_file(root / "vox_2d", "voxshield", victim="slice2d", dice=0.25, training=full())
    results_file(root / "lsp_z", "lsp", dice=0.30, countermeasure="z_smooth", fitted=False)
    results_file(root / "tap", "tap", dice=0.70)  # no countermeasure tried on it: no row
    results_file(root / "random32", "random", dice=0.48, eps=32 / 255, fitted=False)
    results_file(root / "random32_z", "random", dice=0.57, eps=32 / 255, fitted=False, countermeasure="z_smooth")
    # a countermeasure with settings of its own: they are part of the step, not another recipe
    results_file(root / "clean_resampled", dice=0.70, countermeasure="resample")
    results_file(root / "vox_resampled", "voxshield", dice=0.56, training=full(), countermeasure="resample")
    markdown = report.tables(collect_results(root))

    matrix = markdown_rows(markdown, "Countermeasures")
    assert list(matrix) == ["lsp", "random: eps 0.1255", "voxshield"]  # another bound: Table 4's name
    assert matrix["random: eps 0.1255"]["none"] == "60.00" and matrix["random: eps 0.1255"]["z_smooth"] == "95.00"
    assert matrix["voxshield"] == {"method": "voxshield", "none": "50.00", "resample": "80.00",
                                   "slice2d victim": "50.00", "z_smooth": f"{100 * 0.51 / 0.60:.2f}"}
    assert matrix["lsp"] == {"method": "lsp", "none": "-", "resample": "-", "slice2d victim": "-", "z_smooth": "50.00"}
    table1 = markdown_rows(markdown, "Table 1")
    assert table1["voxshield"]["FLARE21 DSC (%)"] == "40.00" and table1["clean"]["FLARE21 DSC (%)"] == "80.00"
    assert "lsp" not in table1
    frontier = markdown_rows(markdown, "Frontier")
    assert list(frontier) == ["random (floor)", "tap", "voxshield"]  # the results without a step only
    assert frontier["random (floor)"]["DSC (% of clean)"] == "60.00" and frontier["voxshield"]["DSC (% of clean)"] == "50.00"


def test_countermeasure_matrix_pairs_pgd_at_by_bound(tmp_path):
    """A copy under PGD-AT is compared with the clean victim attacked at the same bound, as each
    results.json records it (the folder names here say the opposite); a copy attacked at a bound no
    clean victim was gets no ratio."""
    root = tmp_path / "runs"
    results_file(root / "clean_pgd_at_eps16", dice=0.89, countermeasure="pgd_at", pgd_at_eps=4 / 255)
    results_file(root / "clean_pgd_at", dice=0.82, countermeasure="pgd_at", pgd_at_eps=16 / 255)
    results_file(root / "carrier_eps16_pgd_at", "carrier", dice=0.80, eps=16 / 255, fitted=False,
                 countermeasure="pgd_at", pgd_at_eps=16 / 255)
    results_file(root / "random_eps32_pgd_at", "random", dice=0.70, eps=32 / 255, fitted=False,
                 countermeasure="pgd_at", pgd_at_eps=32 / 255)
    results = collect_results(root)

    matrix = countermeasure_matrix([summarise(result) for result in results])
    assert matrix["columns"] == ["pgd_at eps 16/255", "pgd_at eps 32/255"]
    cells = {row["method"]: row["cells"] for row in matrix["rows"]}
    carrier = cells["carrier: eps 0.06275"]["pgd_at eps 16/255"]
    assert carrier["mean"] == pytest.approx(100 * 0.80 / 0.82) and carrier["clean_dsc_percent"] == pytest.approx(82.0)
    assert cells["random: eps 0.1255"] == {"pgd_at eps 32/255": {"mean": None, "min": None, "max": None, "results": 1,
                                                                 "clean_dsc_percent": None}}
    markdown = report.tables(results)
    rows = markdown_rows(markdown, "Countermeasures")
    assert rows["carrier: eps 0.06275"] == {"method": "carrier: eps 0.06275", "pgd_at eps 16/255": "97.56",
                                            "pgd_at eps 32/255": "-"}
    assert rows["random: eps 0.1255"]["pgd_at eps 32/255"] == "no clean reference"
    assert "Clean victims' DSC: pgd_at eps 16/255: 82.00%." in markdown


def test_authors_protocol_section(tmp_path):
    """Every victim of the paper recipe gets a row in its own section, one per copy and exploiter's step
    (last and best-on-validation checkpoints, each as % of the clean victim of that recipe and step;
    seeds averaged; a copy fitted through the augmentation or with a lighter surrogate named as in Table
    4), and stays out of Tables 1-4 and the frontier."""
    root = tmp_path / "runs"
    paper = {"victim": "unet_paper", "recipe_name": "paper"}
    results_file(root / "clean", dice=0.80)
    results_file(root / "clean_paper", dice=0.70, best_dice=0.75, **paper)
    results_file(root / "vox_paper0", "voxshield", dice=0.35, best_dice=0.60, training=full(), **paper)
    results_file(root / "vox_paper1", "voxshield", dice=0.21, best_dice=0.30, training=full(), seed=1, **paper)
    results_file(root / "em_paper", "em", dice=0.56, best_dice=0.66, training={"epochs": 5}, **paper)
    results_file(root / "clean_paper_aug", dice=0.90, best_dice=0.80, countermeasure="nnunet_aug", **paper)
    results_file(root / "vox_paper_aug", "voxshield", dice=0.45, best_dice=0.84, training=full(),
                 countermeasure="nnunet_aug", **paper)
    results_file(root / "eot_paper_aug", "voxshield", dice=0.81, best_dice=0.72, countermeasure="nnunet_aug",
                 training={**full(), "fit_augmentation": True}, **paper)
    # a step no clean victim of the recipe went through: no reference
    results_file(root / "vox_paper_smooth", "voxshield", dice=0.30, best_dice=0.40, training=full(),
                 countermeasure="z_smooth", **paper)
    markdown = report.tables(collect_results(root))

    header, _, *lines = table_lines(markdown, "The authors' protocol")
    assert header[:3] == ["method", "countermeasure", "dataset"]
    rows = {(line[0], line[1]): dict(zip(header, line)) for line in lines}
    eot = "voxshield: full; fit_augmentation True, 50 epochs"
    assert list(rows) == [("clean", "none"), ("em", "none"), ("voxshield", "none"), ("clean", "nnunet_aug"),
                          ("voxshield", "nnunet_aug"), (eot, "nnunet_aug"), ("voxshield", "z_smooth")]

    def numbers(row):
        return [row[name] for name in ("DSC last (%)", "last, % of clean", "DSC best on protected validation (%)",
                                       "best, % of clean", "seeds")]

    def percent(dice, clean_dice):
        return f"{100 * dice / clean_dice:.2f}"

    assert numbers(rows["clean", "none"]) == ["70.00", "100.00", "75.00", "100.00", "0"]
    assert numbers(rows["voxshield", "none"]) == [
        "28.00", percent((0.35 + 0.21) / 2, 0.70), "45.00", percent((0.60 + 0.30) / 2, 0.75), "0, 1"]
    assert numbers(rows["em", "none"]) == ["56.00", percent(0.56, 0.70), "66.00", percent(0.66, 0.75), "0"]
    # after nnU-Net's augmentation, against the clean victim trained after it (90 / 80), not the one without
    assert numbers(rows["clean", "nnunet_aug"]) == ["90.00", "100.00", "80.00", "100.00", "0"]
    assert numbers(rows["voxshield", "nnunet_aug"]) == ["45.00", percent(0.45, 0.90), "84.00", percent(0.84, 0.80), "0"]
    assert numbers(rows[eot, "nnunet_aug"]) == ["81.00", percent(0.81, 0.90), "72.00", percent(0.72, 0.80), "0"]
    assert numbers(rows["voxshield", "z_smooth"]) == ["30.00", "n/a", "40.00", "n/a", "0"]
    assert {row["dataset"] for row in rows.values()} == {"FLARE21"}

    saved = report.write_report(root, tmp_path / "out")["authors_protocol"]["rows"]
    em = next(row for row in saved if row["method"] == "em")
    assert em["countermeasure"] == "none" and em["seeds"] == [0]
    assert em["last_percent_of_clean"] == pytest.approx(100 * 0.56 / 0.70)
    assert em["best_percent_of_clean"] == pytest.approx(100 * 0.66 / 0.75)
    assert list(markdown_rows(markdown, "Table 1")) == ["clean"]
    assert all(title not in markdown for title in ("Table 4", "Countermeasures", "Frontier"))


def test_no_countermeasure_matrix_without_countermeasures(results_dir):
    assert "Countermeasures" not in report.tables(collect_results(results_dir))


def test_networks_other_than_train_json_leave_the_paper_tables(tmp_path):
    """A record naming the networks it was fitted with: the paper's generator stays in Table 1; a
    norm-free generator or a lighter surrogate goes to Table 4 under its own name."""
    config = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    generator = {key: config["generator_def"][key] for key in ("channels", "strides", "num_res_units", "norm", "act")}
    surrogate = {key: config["surrogate_def"][key] for key in ("channels", "strides", "num_res_units", "norm")}
    networks = {"generator": {"in_channels": 1, **generator, "parameters": 1}, "surrogate": {"out_channels": 2, **surrogate}}
    root = tmp_path / "runs"
    results_file(root / "clean", dice=0.80)
    results_file(root / "paper", "voxshield", dice=0.60, training={**full(), **networks})
    results_file(root / "norm_free", "voxshield", dice=0.50,
                 training={**full(), **networks, "generator": {**networks["generator"], "norm": None}})
    results_file(root / "light", "voxshield", dice=0.40,
                 training={**full(), **networks, "surrogate": {**surrogate, "channels": [16, 32, 64, 128, 256]}})
    markdown = report.tables(collect_results(root))

    assert markdown_rows(markdown, "Table 1")["voxshield"]["FLARE21 DSC (%)"] == "60.00"
    table4 = markdown_rows(markdown, "Table 4")
    assert table4["voxshield: full; generator norm None, 50 epochs"]["FLARE21 DSC (%)"] == "50.00"
    assert table4["voxshield: full; surrogate channels [16, 32, 64, 128, 256], 50 epochs"]["FLARE21 DSC (%)"] == "40.00"


def test_fit_lengths_and_training_free_bounds_are_kept_apart(tmp_path):
    root = tmp_path / "runs"
    results_file(root / "clean", dice=0.80)
    results_file(root / "short", "voxshield", dice=0.60, training=full())  # 50 epochs
    results_file(root / "long", "voxshield", dice=0.20, training={**full(), "epochs": 100})
    results_file(root / "short_unetr", "voxshield", victim="unetr", dice=0.50, training=full())
    results_file(root / "lsp", "lsp", dice=0.70, fitted=False)
    results_file(root / "lsp_eps32", "lsp", dice=0.10, fitted=False, eps=32 / 255)
    markdown = report.tables(collect_results(root))

    table1 = markdown_rows(markdown, "Table 1")
    assert list(table1) == ["clean", "lsp", "voxshield, 50 epochs", "voxshield, 100 epochs"]
    assert [table1[row]["FLARE21 DSC (%)"] for row in table1] == ["80.00", "70.00", "60.00", "20.00"]
    table2 = markdown_rows(markdown, "Table 2")
    assert table2["unetr"]["FLARE21 voxshield, 50 epochs DSC (%)"] == "50.00"
    # columns follow Table 1's rows: clean, the methods by name, a method's fits shortest first
    assert [header for header in table2["unet"] if "DSC" in header] == [
        "FLARE21 clean DSC (%)", "FLARE21 lsp DSC (%)", "FLARE21 voxshield, 50 epochs DSC (%)",
        "FLARE21 voxshield, 100 epochs DSC (%)"]
    table3 = markdown_rows(markdown, "Table 3")
    assert {row: cells["FLARE21 DSC (%)"] for row, cells in table3.items()} == {
        "clean (reference)": "80.00", "full, 50 epochs": "60.00", "full, 100 epochs": "20.00"}
    table4 = markdown_rows(markdown, "Table 4")
    assert {row: cells["FLARE21 DSC (%)"] for row, cells in table4.items()} == {
        "clean (reference)": "80.00", "lsp: eps 0.1255": "10.00"}


def test_variant_name():
    assert Variant(CLEAN).name == "clean"
    assert Variant("w/o L_SPD").name == "w/o L_SPD"
    assert Variant(FULL, ("eps 0.06275", "50 epochs")).name == "full; eps 0.06275, 50 epochs"
    assert Variant(FULL) == Variant("full", ())  # equal by value: the tables select by it


def test_frontier_table_and_figure(tmp_path):
    """Victim DSC as % of the clean victims' mean, grouped by (method, support, eps), against the copy's
    PSNR; ablations, other settings, other victims and recipes without a clean twin stay out."""
    root = tmp_path / "runs"
    results_file(root / "clean_seed0", dice=0.80, seed=0)
    results_file(root / "clean_seed1", dice=0.90, seed=1)  # the clean reference: 85%
    results_file(root / "random", "random", dice=0.85, psnr=50.0, ssim=0.99, fitted=False)
    results_file(root / "random_eps16_seed0", "random", dice=0.60, psnr=40.0, ssim=0.95, fitted=False, eps=16 / 255)
    results_file(root / "random_eps16_seed1", "random", dice=0.50, psnr=41.0, ssim=0.97, fitted=False, eps=16 / 255,
                 seed=1)
    for seed, dice in enumerate((0.85, 0.80, 0.68)):
        results_file(root / f"vox_seed{seed}", "voxshield", dice=dice, psnr=49.0, ssim=0.998, training=full(),
                     seed=seed)
    volume = results_file(root / "vox_volume_eps8", "voxshield", dice=0.17, psnr=36.0, ssim=0.96, eps=8 / 255,
                          mask_roi=False, training={**full(), "eps": 8 / 255, "mask_roi": False})
    with_switch(volume, None)  # a newer file recording no countermeasure pairs with the older clean ones
    with_switch(results_file(root / "jpeg", "random", dice=0.10, psnr=50.0, ssim=0.99, fitted=False), "jpeg")
    # left out: an ablation, another ROI dilation, another victim, recipes with no clean victim
    results_file(root / "no_spd", "voxshield", dice=0.10, psnr=49.0, ssim=0.99, training=full(spd=0))
    results_file(root / "dilated", "voxshield", dice=0.10, psnr=48.0, ssim=0.99, training={**full(), "roi_dilation": 2})
    results_file(root / "unetr", "voxshield", victim="unetr", dice=0.10, psnr=49.0, ssim=0.99, training=full())
    results_file(root / "short", "random", dice=0.10, psnr=50.0, ssim=0.99, fitted=False, epochs=50)

    report.write_report(root, tmp_path / "out")
    markdown = (tmp_path / "out" / "tables.md").read_text()
    assert markdown.index("## Table 1") < markdown.index("## Frontier")
    rows = table_lines(markdown, "Frontier")[2:]
    assert [row[:3] for row in rows] == [
        ["random (floor)", "ROI", "4/255"], ["random (floor)", "ROI", "16/255"],
        ["voxshield", "ROI", "4/255"], ["voxshield", "whole volume", "8/255"]]
    percent = {name: 100 * dice / 0.85 for name, dice in
               {"random": 0.85, "r16_0": 0.60, "r16_1": 0.50, "v0": 0.85, "v1": 0.80, "v2": 0.68, "v8": 0.17}.items()}
    random16 = [percent["r16_0"], percent["r16_1"]]
    voxshield = [percent["v0"], percent["v1"], percent["v2"]]
    assert rows[0][3:] == ["50.00", "0.9900", f"{percent['random']:.2f}", "0"]
    assert rows[1][3:] == ["40.50", "0.9600", f"{sum(random16) / 2:.2f} ({min(random16):.2f}-{max(random16):.2f})",
                           "0, 1"]
    assert rows[2][3:] == ["49.00", "0.9980", f"{sum(voxshield) / 3:.2f} ({min(voxshield):.2f}-{max(voxshield):.2f})",
                           "0, 1, 2"]
    assert rows[3][3:] == ["36.00", "0.9600", f"{percent['v8']:.2f}", "0"]
    assert "85.00% (n=2)" in markdown

    saved = json.loads((tmp_path / "out" / "report.json").read_text())["frontier"]["rows"]
    assert [row["floor"] for row in saved] == [True, True, False, False]
    assert saved[1]["eps"] == pytest.approx(16 / 255) and saved[3]["support"] == "whole volume"
    assert saved[2]["dsc_percent_of_clean"]["mean"] == pytest.approx(sum(voxshield) / 3)
    assert saved[2]["clean_dsc_percent"] == {"mean": pytest.approx(85.0), "results": 2}

    figure = tmp_path / "out" / "frontier.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(figure)
    assert pixels.ndim == 3 and pixels[..., :3].std() > 0.05  # not a blank canvas


def with_switch(path, countermeasure):
    """Record a countermeasure in a results file's recipe, as evaluate writes it."""
    content = json.loads(path.read_text())
    content["recipe"]["countermeasure"] = countermeasure
    path.write_text(json.dumps(content))


def test_a_methods_own_hyperparameters_make_a_frontier_line_and_a_table_4_row_of_their_own(tmp_path):
    root = tmp_path / "runs"
    results_file(root / "clean", dice=0.80)
    defaults = {"period": 2.0, "axes": [0, 1], "orientation": "diagonal", "coding": "phase", "outside_amplitude": 1.0}
    results_file(root / "checkerboard", "carrier", dice=0.40, psnr=36.0, ssim=0.97, fitted=False, mask_roi=False,
                 parameters=defaults)
    results_file(root / "period4", "carrier", dice=0.60, psnr=36.5, ssim=0.98, fitted=False, mask_roi=False,
                 parameters={**defaults, "period": 4.0, "orientation": "random"})
    results_file(root / "band", "carrier", dice=0.20, psnr=38.0, ssim=0.98, fitted=False, parameters=defaults)
    results_file(root / "darker", "carrier", dice=0.70, psnr=36.0, ssim=0.99, fitted=False, mask_roi=False,
                 parameters={**defaults, "orientation": "constant", "polarity": -1})
    results_file(root / "brighter", "carrier", dice=0.75, psnr=36.0, ssim=0.99, fitted=False, mask_roi=False,
                 parameters={**defaults, "orientation": "constant", "polarity": 1})
    banded = json.loads((root / "band" / "results.json").read_text())
    banded["protection"]["parameters"]["roi_dilation"] = 3  # another support than the frontier's two
    (root / "band" / "results.json").write_text(json.dumps(banded))

    report.write_report(root, tmp_path / "out")
    markdown = (tmp_path / "out" / "tables.md").read_text()
    assert [row[:5] for row in table_lines(markdown, "Frontier")[2:]] == [
        ["carrier", "whole volume", "4/255", "36.00", "0.9700"],
        ["carrier (orientation constant)", "whole volume", "4/255", "36.00", "0.9900"],
        ["carrier (orientation constant, polarity -1)", "whole volume", "4/255", "36.00", "0.9900"],
        ["carrier (period 4, orientation random)", "whole volume", "4/255", "36.50", "0.9800"]]
    table4 = {row[0] for row in table_lines(markdown, "Table 4")[2:]}
    assert {"carrier: mask_roi False", "carrier: mask_roi False, period 4, orientation random",
            "carrier: roi_dilation 3", "carrier: mask_roi False, orientation constant",
            "carrier: mask_roi False, orientation constant, polarity -1"} <= table4


def test_no_frontier_without_protected_results(tmp_path):
    results_file(tmp_path / "runs" / "clean", dice=0.80)
    report.write_report(tmp_path / "runs", tmp_path / "out")
    assert "Frontier" not in (tmp_path / "out" / "tables.md").read_text()
    assert "frontier" not in json.loads((tmp_path / "out" / "report.json").read_text())
    assert not (tmp_path / "out" / "frontier.png").exists()


def test_comparison_shows_the_slice_where_the_perturbation_is(tmp_path):
    """A perturbation on every other axial slice, none on the ROI's centre slice: the comparison
    figure's slice is the one whose ROI holds the most |delta|, so its difference is not blank."""
    clean = make_demo_dataset(tmp_path / "clean", "flare", num_cases=1, shape=(32, 32, 16))
    protected = tmp_path / "protected"
    shutil.copytree(clean, protected)
    image_name, label_name = "TrainingImg/train_000_0000.nii.gz", "TrainingMask/train_000.nii.gz"
    label = np.asanyarray(nib.load(clean / label_name).dataobj) > 0
    centre = int(round(np.nonzero(label)[2].mean()))
    changed_slices = np.arange(label.shape[2]) % 2 != centre % 2
    image = nib.load(clean / image_name)
    stored = np.asanyarray(image.dataobj)
    change = (label & changed_slices).astype(np.int16) * CHANGE_HU
    nib.save(nib.Nifti1Image(stored + change, image.affine, image.header), protected / image_name)
    (protected / "voxshield_manifest.json").write_text(json.dumps(
        {"cases": [{"case_id": "train_000", "images": [image_name], "label": label_name}]}))

    pair = figures.load_pair(clean, protected)
    delta = pair.protected[0] - pair.clean[0]
    index = figures.strongest_slice(delta, pair.label)
    assert not delta[..., centre].any()  # the ROI-centre slice would show a blank difference
    assert np.abs(delta[..., index][label[..., index]]).min() > 0
    # independently: every changed ROI voxel moves by the same amount, so the slice with most ROI voxels wins
    assert index == int(np.argmax(label.sum(axis=(0, 1)) * changed_slices))
    assert figures.strongest_slice(np.zeros_like(delta), pair.label) == centre  # nothing to show: the centre
    figures.comparison_figure(clean, protected, None, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").is_file()
