"""Countermeasures (custom/countermeasures.py, declared in configs/evaluate.json): what each filter does to
a volume, nnU-Net augmentation's alignment, resampling, PGD adversarial training, and evaluate runs."""

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.transforms import Compose
from scipy import ndimage

from conftest import run_bundle
from custom.bundle_utils import config_files
from custom.countermeasures import COUNTERMEASURES, AdversarialBatch, ResampledInferer, protection_eps, select
from custom.data import LoadCased, open_dataset
from custom.manifest import MANIFEST_NAME


def evaluate_config(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files("voxshield_flare", "evaluate"))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def countermeasure_filter(name: str, **overrides):
    """The one transform configs/evaluate.json declares for filter ``name``."""
    (transform,) = evaluate_config(**overrides).get_parsed_content(f"countermeasure_filters#{name}")
    return transform


def gaussian_nyquist_response(sigma: float, truncate: float = 4.0) -> float:
    """
    The response at Nyquist, sum_k (-1)^k g_k, of the discrete Gaussian the smoothing filters use
    (scipy's: g_k proportional to exp(-k^2 / (2 sigma^2)) for |k| <= int(truncate sigma + 1/2), summing to 1).
    """
    radius = int(truncate * sigma + 0.5)
    weights = [math.exp(-(k**2) / (2 * sigma**2)) for k in range(-radius, radius + 1)]
    return sum((-1) ** k * w for k, w in zip(range(-radius, radius + 1), weights)) / sum(weights)


def test_z_smooth_damps_alternating_slices_by_the_kernel_response():
    nyquist = gaussian_nyquist_response(1.0)
    assert 0.014 < nyquist < 0.015  # a sigma-1 Gaussian keeps 1.4% of the slice-to-slice alternation
    z = np.arange(16)
    image = np.broadcast_to(0.5 + 0.25 * (-1.0) ** z, (1, 6, 6, 16)).astype(np.float32)
    smoothed = np.asarray(countermeasure_filter("z_smooth")({"image": image.copy()})["image"])
    inner = slice(4, 12)  # slices whose 9-slice kernel lies inside the volume
    expected = 0.5 + 0.25 * nyquist * (-1.0) ** z[inner]
    np.testing.assert_allclose(smoothed[..., inner], np.broadcast_to(expected, (1, 6, 6, 8)), atol=1e-6)
    # in-plane it does nothing, and the border slices keep their intensity: a volume constant along z
    # (alternating along x) comes back unchanged
    in_plane = np.moveaxis(image, 3, 1).copy()
    np.testing.assert_allclose(np.asarray(countermeasure_filter("z_smooth")({"image": in_plane})["image"]), in_plane,
                               atol=1e-6)


def test_smooth3d_damps_a_checkerboard_by_the_cubed_response():
    nyquist = gaussian_nyquist_response(1.0)
    x, y, z = np.meshgrid(*(np.arange(12),) * 3, indexing="ij")
    image = (0.5 + 0.25 * (-1.0) ** (x + y + z))[None].astype(np.float32)
    smooth = countermeasure_filter("smooth3d")
    smoothed = np.asarray(smooth({"image": image})["image"])
    inner = (0, *(slice(4, 8),) * 3)
    expected = 0.5 + 0.25 * nyquist**3 * (-1.0) ** (x + y + z)
    np.testing.assert_allclose(smoothed[inner], expected[inner[1:]], atol=1e-6)
    constant = np.full((1, 6, 6, 6), 0.7, np.float32)
    np.testing.assert_allclose(np.asarray(smooth({"image": constant})["image"]), constant, atol=1e-6)


def test_median_removes_a_spike_and_keeps_a_constant():
    image = np.full((1, 9, 9, 9), 0.3, np.float32)
    image[0, 4, 4, 4] = 1.0
    filtered = np.asarray(countermeasure_filter("median")({"image": image})["image"])
    np.testing.assert_allclose(filtered, 0.3, atol=1e-7)


def test_resample_changes_the_grid_as_the_spacing_says_and_keeps_the_label_aligned():
    # 17 x 17 voxels of 1 mm and 9 slices of 4 mm, to 2 mm: the 16 mm between the first and last
    # in-plane centres take 9 voxels (halved), the 32 mm through the slices 17 (doubled)
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    cube = np.zeros((1, 17, 17, 9), np.float32)
    cube[0, 4:12, 6:15, 2:6] = 1
    resample = countermeasure_filter("resample", resample_spacing=[2.0, 2.0, 2.0])
    out = resample({"image": MetaTensor(cube.copy(), affine=affine), "label": MetaTensor(cube.copy(), affine=affine)})
    assert out["image"].shape == out["label"].shape == (1, 9, 9, 17)
    np.testing.assert_allclose(out["label"].affine.numpy(), np.diag([2.0, 2.0, 2.0, 1.0]))

    def world_bounds(mask, spacing):
        corners = np.argwhere(mask)
        return corners.min(0) * spacing, corners.max(0) * spacing

    before = world_bounds(cube[0] > 0, np.array([1.0, 1.0, 4.0]))
    for resampled in (out["label"], out["image"]):  # nearest for the label, bilinear for the image
        after = world_bounds(np.asarray(resampled)[0] > 0.5, 2.0)
        for edge_before, edge_after in zip(before, after):
            assert np.abs(edge_after - edge_before).max() <= 2.0  # within one voxel of the new grid


def test_loader_gives_the_affine_for_resampling(flare_data):
    spec = open_dataset(flare_data)
    case = spec.cases[0]
    plain = LoadCased(spec)({"case_id": case.case_id})
    with_affine = LoadCased(spec, with_affine=True)({"case_id": case.case_id})
    label_affine = nib.load(flare_data / case.label).affine
    for key in ("image", "label"):
        assert isinstance(with_affine[key], MetaTensor) and not isinstance(plain[key], MetaTensor)
        np.testing.assert_array_equal(with_affine[key].numpy(), plain[key])
        np.testing.assert_allclose(with_affine[key].affine.numpy(), label_affine)


def test_resampled_inferer_predicts_at_the_spacing_and_answers_on_the_input_grid():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    cube = np.zeros((1, 1, 30, 30, 12), np.float32)
    cube[..., 8:22, 10:20, 3:9] = 1
    seen = []

    def threshold(image):  # two-class logits: foreground above 0.5, remembering the grid it was given
        seen.append(image.shape)
        return torch.cat([0.5 - image, image - 0.5], dim=1)

    inferer = ResampledInferer(lambda image, network: network(image), pixdim=1.5)
    logits = inferer(MetaTensor(cube, affine=affine), threshold)
    assert seen == [(1, 1, 16, 16, 19)]  # 29 x 0.8 mm / 1.5 mm: 15 whole steps, 11 x 2.5 mm / 1.5 mm: 18
    assert logits.shape == (1, 2, 30, 30, 12)
    prediction = logits.argmax(1)[0].numpy()
    truth = cube[0, 0] > 0
    dice = 2 * (prediction.astype(bool) & truth).sum() / (prediction.sum() + truth.sum())
    assert dice > 0.85
    mismatch = prediction.astype(bool) != truth
    boundary = ndimage.binary_dilation(truth, np.ones((3, 3, 3))) & ~ndimage.binary_erosion(truth, np.ones((3, 3, 3)))
    assert not (mismatch & ~boundary).any()  # back on the grid, errors only where the cube's edge was resampled


def test_jpeg_is_lossy_and_keeps_shape_dtype_and_range():
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((1, 32, 32, 4)), (0, 2, 2, 0)).astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    jpeg = countermeasure_filter("jpeg")
    for volume in (image, torch.as_tensor(image)):
        decoded = jpeg({"image": volume})["image"]
        assert type(decoded) is type(volume) and decoded.shape == volume.shape and decoded.dtype == volume.dtype
    decoded = jpeg({"image": image})["image"]
    assert decoded.min() >= 0 and decoded.max() <= 1
    eight_bit = np.round(image * 255) / 255
    assert np.abs(decoded - eight_bit).max() > 2 / 255  # more than 8-bit quantisation was lost
    assert np.abs(decoded - image).mean() < 0.05  # but it is still the same image


def test_nnunet_aug_moves_image_and_label_together():
    augmentation = evaluate_config().get_parsed_content("countermeasure_augmentations#nnunet_aug")
    spatial = [transform for transform in augmentation if "label" in transform.keys]
    assert [type(transform).__name__ for transform in spatial] == ["RandRotated", "RandZoomd"] + ["RandFlipd"] * 3
    for transform in spatial:
        transform.prob = 1.0  # every spatial transform, every time
    label = np.zeros((1, 32, 32, 16), np.float32)  # an L: no flip or rotation maps it onto itself
    label[0, 6:20, 8:14, 3:12] = 1
    label[0, 6:10, 14:26, 3:8] = 1
    for seed in range(8):
        transform = Compose(spatial)
        transform.set_random_state(seed)
        out = transform({"image": label.copy(), "label": label.copy()})
        image, moved = np.asarray(out["image"])[0] > 0.5, np.asarray(out["label"])[0] > 0.5
        assert image.shape == moved.shape == label.shape[1:]
        # the label-shaped image (interpolated) is the label (nearest) but where interpolation
        # meets the label's edge
        edge = ndimage.binary_dilation(moved, np.ones((3, 3, 3))) & ~ndimage.binary_erosion(moved, np.ones((3, 3, 3)))
        assert not ((image != moved) & ~edge).any(), seed
        assert (image == moved).mean() > 0.95


def test_pgd_at_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, 3, padding=1)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.rand(2, 1, 8, 8, 8)
    label = (torch.rand(2, 1, 8, 8, 8) > 0.5).float()
    eps = 4 / 255
    adversarial = AdversarialBatch(network, loss, eps, steps=3)
    assert adversarial.step_size == pytest.approx(eps / 2)
    attacked, same_label = adversarial({"image": image, "label": label})
    assert same_label is not None and torch.equal(same_label, label)
    assert (attacked - image).abs().max() <= eps + 1e-6
    assert attacked.min() >= 0 and attacked.max() <= 1
    with torch.no_grad():
        assert loss(network(attacked), label) > loss(network(image), label)
    assert all(parameter.grad is None for parameter in network.parameters())  # the attack trains nothing


def test_pgd_at_eps_comes_from_the_manifest(tmp_path):
    assert protection_eps(tmp_path, 4 / 255) == pytest.approx(4 / 255)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"eps_normalised": 0.05, "cases": [{"case_id": "a"}]}))
    assert protection_eps(tmp_path, 4 / 255) == 0.05


def test_unknown_countermeasure_is_refused():
    with pytest.raises(ValueError, match="unknown countermeasure 'sharpen'; choose one of " + ", ".join(COUNTERMEASURES)):
        select("sharpen", {})
    assert select(None, {"jpeg": ["a"]}) == [] and select("pgd_at", {"jpeg": ["a"]}) == []
    assert select("jpeg", {"jpeg": ["a"]}) == ["a"]


def test_evaluate_refuses_an_unknown_countermeasure(flare_data, tmp_path):
    result = run_bundle("evaluate", "--train_dir", str(flare_data), "--test_list", "['train_002']",
                        "--countermeasure", "sharpen", "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "unknown countermeasure 'sharpen'; choose one of z_smooth, smooth3d, median" in result.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def _evaluate(train_dir, test_dir, output_dir, *args):
    result = run_bundle("evaluate", "--train_dir", str(train_dir), "--test_dir", str(test_dir),
                        "--test_list", "['train_002']", "--epochs", "1", "--patch_size", "[32,32,16]",
                        "--output_dir", str(output_dir), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "results.json").read_text())


def _scored_in_3d(results):
    diagonal = math.sqrt((32 * 0.8) ** 2 + (32 * 0.8) ** 2 + (16 * 2.5) ** 2)  # the demo case's extent, mm
    (case,) = results["metrics"]["cases"]
    assert case["case_id"] == "train_002" and len(case["regions"]) == 4
    for region in case["regions"].values():
        assert 0 <= region["dice"] <= 1 and 0 <= region["hd95_mm"] <= diagonal + 1e-9


def test_slice2d_victim_with_jpeg_end_to_end(flare_data, tmp_path):
    results = _evaluate(flare_data, flare_data, tmp_path / "out", "--victim", "slice2d", "--countermeasure", "jpeg")
    assert results["recipe"]["victim"] == "slice2d" and results["run"]["victim"] == "slice2d"
    assert results["recipe"]["countermeasure"] == "jpeg" and results["recipe"]["countermeasure_settings"] is None
    _scored_in_3d(results)


def test_resample_end_to_end(flare_data, tmp_path):
    results = _evaluate(flare_data, flare_data, tmp_path / "out", "--countermeasure", "resample",
                        "--resample_spacing", "[1.6,1.6,1.6]")
    assert results["recipe"]["countermeasure"] == "resample"
    assert results["recipe"]["countermeasure_settings"]["spacing_mm"] == [1.6, 1.6, 1.6]
    _scored_in_3d(results)


def test_pgd_at_end_to_end_reads_eps_from_the_manifest(flare_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(flare_data, copy)
    manifest = {"method": "random", "eps_normalised": 8 / 255, "cases": [{"case_id": "train_000"}]}
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    results = _evaluate(copy, flare_data, tmp_path / "out", "--countermeasure", "pgd_at")
    assert results["recipe"]["countermeasure"] == "pgd_at"
    assert results["recipe"]["countermeasure_settings"] == {"eps": 8 / 255, "steps": 3, "step_size": 4 / 255}
    _scored_in_3d(results)


def test_the_config_puts_each_countermeasure_in_its_place(flare_data):
    crop = ["SpatialPadd", "RandCropByPosNegLabeld"]
    spatial, mirror = ["RandRotated", "RandZoomd"], ["RandFlipd"] * 3
    intensity = ["RandGaussianNoised", "RandGaussianSmoothd", "RandScaleIntensityd", "RandScaleIntensityFixedMeand",
                 "RandSimulateLowResolutiond", "RandAdjustContrastd", "RandAdjustContrastd"]
    pipelines = {
        None: ["LoadCased", *crop, "EnsureTyped"],
        "z_smooth": ["LoadCased", "GaussianSmoothNearestd", *crop, "EnsureTyped"],
        "smooth3d": ["LoadCased", "GaussianSmoothNearestd", *crop, "EnsureTyped"],
        "median": ["LoadCased", "MedianSmoothd", *crop, "EnsureTyped"],
        "resample": ["LoadCased", "Spacingd", *crop, "EnsureTyped"],
        "jpeg": ["LoadCased", "SliceJPEGd", *crop, "EnsureTyped"],
        "nnunet_aug": ["LoadCased", *crop, *spatial, *intensity, *mirror, "EnsureTyped"],
        "nnunet_spatial": ["LoadCased", *crop, *spatial, "EnsureTyped"],
        "nnunet_intensity": ["LoadCased", *crop, *intensity, "EnsureTyped"],
        "nnunet_mirror": ["LoadCased", *crop, *mirror, "EnsureTyped"],
        "pgd_at": ["LoadCased", *crop, "EnsureTyped"],
    }
    assert set(pipelines) == {None, *COUNTERMEASURES}
    for name, expected in pipelines.items():
        parser = evaluate_config(train_dir=str(flare_data), test_list=["train_002"], countermeasure=name)
        trainer, evaluation = parser.get_parsed_content("trainer"), parser.get_parsed_content("evaluation")
        assert [type(t).__name__ for t in trainer.data_loader.dataset.transform.transforms] == expected, name
        assert isinstance(trainer.prepare_batch, AdversarialBatch) == (name == "pgd_at"), name
        assert isinstance(evaluation.inferer, ResampledInferer) == (name == "resample"), name
        assert evaluation.recipe["countermeasure"] == name
        batch = next(iter(trainer.data_loader))  # the pipeline runs: crops of the patch size, labels 0..4
        assert batch["image"].shape[1:] == batch["label"].shape[1:] == (1, 64, 64, 32), name
        assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3, 4}, name
    assert trainer.prepare_batch.eps == pytest.approx(4 / 255)  # clean data: the config's default
