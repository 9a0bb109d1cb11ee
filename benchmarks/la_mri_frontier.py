"""
The price of protection on ../shared/data/la_mri: for each method, perturbation budget eps and support
(the label alone, ``--mask_roi true``, or the whole volume, ``--mask_roi false``), fit the method on
the 80 training cases, protect them, train the standard UNet victim (evaluate.json's patch recipe,
--victim_epochs, one run per --victim_seeds seed) on the copy and score it on the 20 clean test cases.
The clean victims of the same seeds are trained first (their DSC is the 100% the frontier is drawn
against). The report then draws frontier.png (victim DSC as % of clean against whole-volume PSNR) and
adds the frontier table to tables.md, from every result in --results_dir.

Runs are named as in benchmarks/la_mri_benchmark.py wherever that benchmark has the same run (``full``
is VoxShield at 4/255 in the ROI, ``random_eps16`` the random control at 16/255, ...), so results it
already wrote are reused under --resume rather than trained again; other runs are named
METHOD_epsN (ROI) and METHOD_epsN_volume (whole volume), N being eps x 255.

Stop rule: for each method and support the budgets run from the smallest up, and a budget is
skipped (listed in the record as stopped) once a smaller budget's victims, averaged over the seeds
of this invocation found in --results_dir, score at most --stop_at percent (default 20, the
project's protection target) of the clean victims' mean DSC: that budget already protects, and a
larger one only makes the copy more visible. The rule reads results from earlier invocations too,
so it holds when a grid is split.

Cost: every step is a bundle command; on the project's 2-core CPU a victim takes about 4 minutes and
fitting plus protecting from under 2 minutes (random, LSP) to over 20 (PUE) (benchmark_baselines.json),
so split a grid with --methods, --budgets, --supports and --victim_seeds into invocations of under an
hour, each with its own --record and with --resume:

    python benchmarks/la_mri_frontier.py --methods random,lsp --budgets 4,8 --supports roi --resume \\
        --record benchmark_frontier_random_lsp_roi_4_8.json

Checkpoints and protected copies go to --work_dir (default benchmarks/work, ignored by git), results, the record
and the report to --results_dir (default benchmarks/results/la_mri); --data and --results_dir let the
tests run the whole benchmark on a tiny demo dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from la_mri_benchmark import (
    DEFAULT_EPS, RUNS, add_protocol_arguments, protect_run, report_run, seeds, start, victim_results, victim_run,
)
from custom.protectors import METHODS  # la_mri_benchmark put the repository on sys.path

BUDGETS = (4, 8, 16, 32)  # eps x 255
SUPPORTS = {"roi": "true", "volume": "false"}  # --supports name -> --mask_roi
TARGET_PERCENT = 20.0  # the project's protection target: a protected victim at most 20% of the clean DSC


def frontier_run(method: str, level: int, support: str) -> tuple[str, list[str]]:
    """
    The run of one grid point: its name (la_mri_benchmark.py's, where it has the same run) and its
    perturbation overrides, shared by training and protect.

    Args:
        method: a protection method (custom.protectors.METHODS).
        level: the budget, eps x 255.
        support: a key of SUPPORTS.
    """
    perturbation = [] if abs(level / 255 - DEFAULT_EPS) < 1e-12 else ["--eps", repr(level / 255)]
    if support != "roi":
        perturbation += ["--mask_roi", SUPPORTS[support]]
    known = [name for name, entry in RUNS.items() if entry == (method, [], perturbation)]
    if known:
        return known[0], perturbation
    return f"{method}_eps{level}" + ("" if support == "roi" else f"_{support}"), perturbation


def mean_dice(result_files: list[Path]) -> float | None:
    """The mean of the victims' mean DSC over the result files that exist; None when none does."""
    found = [json.loads(path.read_text())["metrics"]["aggregate"]["mean_dice"]
             for path in result_files if path.is_file()]
    return sum(found) / len(found) if found else None


def protecting_budget(options: argparse.Namespace, method: str, level: int, support: str) -> int | None:
    """The stop rule: the smallest budget below ``level`` whose victims (this invocation's seeds)
    score at most --stop_at percent of the clean victims' mean DSC, or None."""
    results = Path(options.results_dir)
    clean = mean_dice([victim_results(results, "clean", "unet", seed) / "results.json" for seed in seeds(options)])
    if not clean:
        return None
    for smaller in sorted({*BUDGETS, *budgets(options)}):
        if smaller >= level:
            break
        run, _ = frontier_run(method, smaller, support)
        dice = mean_dice([victim_results(results, run, "unet", seed) / "results.json" for seed in seeds(options)])
        if dice is not None and 100 * dice / clean <= options.stop_at:
            return smaller
    return None


def budgets(options: argparse.Namespace) -> list[int]:
    """The budgets of --budgets (eps x 255), smallest first."""
    return sorted(int(level) for level in options.budgets.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser, record="benchmark_frontier.json")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ",".join(METHODS))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated eps x 255")
    parser.add_argument("--supports", default=",".join(SUPPORTS), help="comma-separated, from " + ",".join(SUPPORTS))
    parser.add_argument("--stop_at", type=float, default=TARGET_PERCENT,
                        help="skip a method's larger budgets once its victims score at most this percent of clean")
    options = parser.parse_args()
    methods, supports = options.methods.split(","), options.supports.split(",")
    unknown = [name for name in methods if name not in METHODS] + [name for name in supports if name not in SUPPORTS]
    if unknown:
        parser.error(f"unknown method(s) or support(s) {', '.join(unknown)}")

    steps = start(options)
    if not options.skip_clean:
        for seed in seeds(options):
            victim_run(steps, options, "clean", "clean", steps.data, "unet", seed)
    runs = []
    for method in methods:
        for support in supports:
            for level in budgets(options):
                run, perturbation = frontier_run(method, level, support)
                protected_at = protecting_budget(options, method, level, support)
                if protected_at is not None:
                    steps.skip(run, f"stopped: {method} in the {support} protects at {protected_at}/255 already")
                    continue
                protected = protect_run(steps, options, run, method, [], perturbation)
                for seed in seeds(options):
                    victim_run(steps, options, run, method, protected, "unet", seed)
                runs.append(run)
    report_run(steps, options)
    print(json.dumps(steps.summary()["steps"], indent=1))


if __name__ == "__main__":
    main()
