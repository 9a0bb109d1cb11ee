"""
Why a victim still learns from a protected copy of ../shared/data/la_mri: the measurements behind
the protection target of issue 3, from the outputs of benchmarks/la_mri_benchmark.py.

1. Signal scale. For each training case, in the normalised intensities that protect perturbs
   ([0, 1], the dataset's MRI percentiles): the contrast between the ROI and a ring of --ring voxels
   around it, the spread of intensities inside the ROI, and the voxel noise inside it (std of the
   difference between axial neighbours, over sqrt 2), each next to eps.
2. The perturbation of each protected copy in --work_dir (RUN/protected), eps being the bound its
   manifest records: mean |delta| / eps and the fraction of ROI voxels at the bound, and delta's RMS
   over the ROI's voxel noise.
3. Learning curves. Each victim's mean training loss per epoch (its TensorBoard log in the result
   folder) beside the clean victim of the same architecture: a shortcut the victim uses shows as a
   protected curve that falls faster than the clean one; the last epoch's rise over the lowest one
   shows how much a single short run's final score is luck.
4. The surrogate F a VoxShield fit ends with (--surrogates RUN,...: RUN/ckpt/surrogate.pt), scored
   like a victim (evaluate.json's sliding window): on the clean test cases, and on the first
   --surrogate_cases training cases, clean and protected. F was trained on x_p beside the generator
   that made it: a clean score far under its protected one means F came to rely on the noise.

Writes diagnostics.json (with hardware, versions and wall time) and diagnostics.md to --results_dir.

    python benchmarks/la_mri_diagnostics.py [--runs full,random,em,lsp] [--surrogates full,paper_100]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from custom.figures import CasePair, load_pair  # noqa: E402
from custom.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from custom.markdown import markdown_table  # noqa: E402
from custom.provenance import hardware, software_versions  # noqa: E402
from custom.verify import dilate  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "la_mri"
BUNDLE = "voxshield_brats"  # the bundle la_mri_benchmark.py runs


def case_statistics(clean: np.ndarray, protected: np.ndarray, roi: np.ndarray, ring_width: int, eps: float) -> dict:
    """
    Signal scale and perturbation of one single-channel case, in normalised units.

    Args:
        clean, protected: (H, W, D) the clean case and its protected copy.
        roi: (H, W, D) boolean region of interest.
        ring_width: width in voxels of the ring around the ROI its contrast is measured against.
        eps: the bound the copy was made with; a voxel within 1 % of it counts as at the bound.
    """
    ring = dilate(roi, ring_width) & ~roi
    axial_pairs = roi[..., 1:] & roi[..., :-1]
    voxel_noise = float(np.std((clean[..., 1:] - clean[..., :-1])[axial_pairs]) / math.sqrt(2))
    delta = (protected - clean)[roi]
    return {
        "roi_ring_contrast": float(abs(clean[roi].mean() - clean[ring].mean())),
        "roi_std": float(clean[roi].std()),
        "roi_voxel_noise": voxel_noise,
        "delta_mean_abs_over_eps": float(np.abs(delta).mean() / eps),
        "delta_fraction_at_bound": float((np.abs(delta) >= 0.99 * eps).mean()),
        "delta_rms_over_voxel_noise": float(np.sqrt(np.mean(delta**2)) / voxel_noise),
    }


def copy_statistics(manifest: dict, pairs: Iterable[CasePair], ring_width: int) -> dict:
    """
    case_statistics of the cases of a protected copy, against the bound the copy was made with.

    Args:
        manifest: the copy's manifest; its ``eps_normalised`` is the bound.
        pairs: its cases beside their clean twins (single channel).
        ring_width: see case_statistics.

    Returns:
        ``eps``, the number of ``cases`` and the ``mean`` of each statistic over them.
    """
    eps = manifest["eps_normalised"]
    cases = [case_statistics(pair.clean[0], pair.protected[0], pair.label > 0, ring_width, eps) for pair in pairs]
    means = {key: float(np.mean([case[key] for case in cases])) for key in cases[0]}
    return {"eps": eps, "cases": len(cases), "mean": means}


def perturbation_statistics(data: Path, protected: Path, ring_width: int) -> dict:
    """copy_statistics of every case of the protected copy ``protected`` of ``data``."""
    manifest = read_manifest(protected)
    pairs = (load_pair(data, protected, entry["case_id"]) for entry in manifest["cases"])
    return copy_statistics(manifest, pairs, ring_width)


def epoch_losses(result_dir: Path) -> list[float] | None:
    """Mean victim training loss per epoch from a result folder's TensorBoard log (None without one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted((result_dir / "tensorboard").glob("events.out.tfevents.*"))
    if not logs:
        return None
    accumulator = EventAccumulator(str(logs[-1]))
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("victim_loss")]
    recipe = json.loads((result_dir / "results.json").read_text())["recipe"]
    per_epoch = recipe["iterations"] // recipe["epochs"]
    return [float(np.mean(losses[start : start + per_epoch])) for start in range(0, len(losses), per_epoch)]


def learning_curves(results: Path) -> dict:
    """Per result folder: victim, method, DSC, epoch losses, and the gap to the clean victim's curve."""
    curves = {}
    for result_file in sorted(results.glob("*/results.json")):
        result = json.loads(result_file.read_text())
        losses = epoch_losses(result_file.parent)
        if losses is None:
            continue
        curves[result_file.parent.name] = {
            "victim": result["recipe"]["victim"],
            "method": (result.get("protection") or {}).get("method", "clean"),
            "seed": result["recipe"]["seed"],
            "dsc_mean": result["metrics"]["aggregate"]["mean_dice"],
            "epoch_losses": losses,
            "last_epoch_rise": losses[-1] - min(losses),
        }
    for curve in curves.values():
        clean = [other for other in curves.values() if other["method"] == "clean" and other["victim"] == curve["victim"]
                 and other["seed"] == curve["seed"]]
        if clean:
            gaps = np.subtract(curve["epoch_losses"], clean[0]["epoch_losses"])
            curve["loss_minus_clean_first_half"] = float(gaps[: len(gaps) // 2].mean())
    return curves


def surrogate_scores(data: Path, run_dir: Path, training_cases: int) -> dict:
    """Mean DSC of RUN/ckpt/surrogate.pt on the clean test cases and on the first ``training_cases``
    training cases, clean and protected (RUN/protected)."""
    import torch
    from monai.bundle import ConfigParser

    from custom.bundle_utils import config_files
    from custom.evaluate import held_out_split, score_cases
    from custom.seg_metrics import aggregate

    def parsed(workflow: str, key: str):
        parser = ConfigParser()
        parser.read_config(config_files(BUNDLE, workflow))
        parser["dataset_dir"] = parser["train_dir"] = str(data)
        return parser.get_parsed_content(key)

    surrogate = parsed("training", "surrogate_def")
    surrogate.load_state_dict(torch.load(run_dir / "ckpt" / "surrogate.pt", map_location="cpu", weights_only=True))
    inferer = parsed("evaluate", "inferer")
    protected, test = held_out_split(str(run_dir / "protected"), str(data))
    clean, _ = held_out_split(str(data), str(data))

    def dsc(spec, cases=None) -> float:
        spec = dataclasses.replace(spec, cases=spec.cases[:cases])
        return aggregate(score_cases(surrogate, inferer, spec))["mean_dice"]

    return {"clean_test": dsc(test), "clean_training": dsc(clean, training_cases),
            "protected_training": dsc(protected, training_cases), "training_cases": training_cases,
            "test_cases": len(test.cases)}


def markdown(report: dict) -> str:
    """diagnostics.md: the signal scale and perturbation of each protected copy (over its own bound),
    the victims' learning curves and the fitted surrogates' scores."""
    scale = report["signal_scale"]
    perturbation_rows = []
    for run, stats in report["perturbations"].items():
        mean, eps = stats["mean"], stats["eps"]
        perturbation_rows.append([
            f"{run} ({stats['cases']} cases)", f"{eps:.4f}", f"{mean['roi_ring_contrast'] / eps:.1f}",
            f"{mean['roi_std'] / eps:.1f}", f"{mean['roi_voxel_noise'] / eps:.1f}",
            f"{mean['delta_mean_abs_over_eps']:.2f}", f"{mean['delta_fraction_at_bound']:.2f}",
            f"{mean['delta_rms_over_voxel_noise']:.2f}",
        ])
    curve_rows = []
    for name, curve in report["learning_curves"].items():
        gap = curve.get("loss_minus_clean_first_half")
        curve_rows.append([
            name, str(curve["victim"]), str(curve["method"]), str(curve["seed"]), f"{100 * curve['dsc_mean']:.2f}",
            "-" if gap is None else f"{gap:+.3f}", f"{curve['last_epoch_rise']:.3f}",
            " ".join(f"{loss:.3f}" for loss in curve["epoch_losses"]),
        ])
    lines = [
        "## Signal scale and perturbation (normalised intensities; eps: the bound in each copy's manifest)", "",
        markdown_table(["copy", "eps", "ROI-ring contrast / eps", "ROI std / eps", "ROI voxel noise / eps",
                        "mean abs(delta) / eps", "ROI voxels at the bound", "delta RMS / voxel noise"],
                       perturbation_rows),
        "", f"Ring: {scale['ring_width']} voxels outside the ROI.", "",
        "## Victim learning curves (mean training loss per epoch)", "",
        markdown_table(["result", "victim", "method", "seed", "DSC (%)", "loss - clean, first half", "last-epoch rise",
                        "losses by epoch"], curve_rows),
    ]
    if report["surrogates"]:
        surrogate_rows = [
            [run, f"{100 * scores['clean_test']:.2f} ({scores['test_cases']})",
             f"{100 * scores['clean_training']:.2f} ({scores['training_cases']})",
             f"{100 * scores['protected_training']:.2f}"]
            for run, scores in report["surrogates"].items()
        ]
        lines += ["", "## The fitted surrogate F, scored like a victim (mean DSC, %)", "",
                  markdown_table(["fit", "clean test cases", "clean training cases", "their protected copies"],
                                 surrogate_rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results" / "la_mri"))
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--runs", default="full,random,em,lsp", help="protected copies (RUN/protected in --work_dir)")
    parser.add_argument("--ring", type=int, default=3, help="width in voxels of the ring around the ROI")
    parser.add_argument("--surrogates", default="", help="VoxShield fits whose surrogate to score (RUN/ckpt/surrogate.pt)")
    parser.add_argument("--surrogate_cases", type=int, default=10, help="training cases the surrogates are scored on")
    options = parser.parse_args()
    data, results, work = Path(options.data), Path(options.results_dir), Path(options.work_dir)
    if not (data / "dataset.json").is_file():
        sys.exit(f"{data}: la_mri not found (it lives in ../shared/data beside the repository).")
    started = time.perf_counter()
    perturbations = {}
    for run in options.runs.split(","):
        protected = work / run / "protected"
        if not (protected / MANIFEST_NAME).is_file():
            sys.exit(f"{protected}: no protected copy; run benchmarks/la_mri_benchmark.py --runs {run} first.")
        print(f"== {run}", flush=True)
        perturbations[run] = perturbation_statistics(data, protected, options.ring)
    surrogates = {}
    for run in filter(None, options.surrogates.split(",")):
        if not (work / run / "ckpt" / "surrogate.pt").is_file():
            sys.exit(f"{work / run / 'ckpt' / 'surrogate.pt'}: not found; only a VoxShield fit writes one.")
        print(f"== surrogate of {run}", flush=True)
        surrogates[run] = surrogate_scores(data, work / run, options.surrogate_cases)
    report = {
        "signal_scale": {"ring_width": options.ring},
        "perturbations": perturbations,
        "surrogates": surrogates,
        "learning_curves": learning_curves(results),
        "hardware": hardware(),
        "software": software_versions(),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (results / "diagnostics.json").write_text(json.dumps(report, indent=1))
    (results / "diagnostics.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
