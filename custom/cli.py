"""
The ``voxshield`` command (a fire CLI): the bundles' workflows under one name, for a checkout, an
installed package (``pip install .``), the Docker image and an exported model-zoo bundle.

    voxshield protect  --bundle flare --dataset_dir DATA --ckpt_dir CKPT --output_dir OUT [--key value ...]
    voxshield train    --bundle flare --dataset_dir DATA --ckpt_dir CKPT [--epochs N] [--key value ...]
    voxshield evaluate --bundle flare --train_dir TRAIN --test_dir CLEAN --output_dir RESULTS [...]
    voxshield report   --bundle flare --results "['RESULTS']" --output_dir REPORT [...]
    voxshield verify   --source DATA --protected OUT
    voxshield regrid   --source DATA --output OUT --grid 160 [--normalisation zscore]
    voxshield export   --bundle flare --ckpt_dir CKPT --output voxshield_flare.zip

train, protect, evaluate and report run the bundle's workflow (its configs/bundle.json, then the
shared configs/train.json, protect.json, evaluate.json or report.json:
``custom.bundle_utils.config_files``) in this process through ``monai.bundle.run``, with every extra
``--key value`` passed on as a config override, so each gives what the README's
``python -m monai.bundle run <workflow> --config_file "[...]" ...`` gives. Two differences, both about
where things go: TensorBoard logs default to CKPT/logs (not <bundle>/eval), and an installed package
(whose bundle folder is read-only site-packages) needs the folders given explicitly.
"""

import json
import os
import sys
from pathlib import Path

BUNDLES = {"flare": "voxshield_flare", "brats": "voxshield_brats"}


class CLIError(Exception):
    """A usage problem: printed as one line ``voxshield: error: ...``, exit status 2."""


def bundle_name(bundle: str) -> str:
    """``flare`` / ``brats`` (or the full bundle name) -> ``voxshield_flare`` / ``voxshield_brats``."""
    key = str(bundle).strip().lower()
    if key in BUNDLES:
        return BUNDLES[key]
    if key in BUNDLES.values():
        return key
    raise CLIError(f"--bundle must be one of {', '.join(BUNDLES)}, got {bundle!r}.")


def locate_bundle(name: str) -> Path:
    """The bundle folder holding ``configs/``: a checkout, an installed package or an exported zoo
    bundle, as ``custom.bundle_utils.bundle_root`` finds it (the configs compute the same folder)."""
    from custom import bundle_utils

    root = Path(bundle_utils.bundle_root(name))
    first = Path(bundle_utils.config_files(name, "training")[0])
    if not first.is_file():
        raise CLIError(f"cannot find the {name} bundle's configs in {root}.")
    if f"bundle_root('{name}')" not in first.read_text():
        raise CLIError(f"{root}: this exported bundle is not {name}; run {root.name}'s own command.")
    return root


def _help_flag_to_fire(argv: list[str]) -> list[str]:
    """fire hands ``--help`` to a command's ``**overrides`` instead of showing help; move it behind
    ``--``, where fire reads its own flags, so ``voxshield protect --help`` shows protect's help."""
    if "--" in argv:
        head, tail = argv[: argv.index("--")], argv[argv.index("--") :]
    else:
        head, tail = argv, []
    wanted = [arg for arg in head if arg in ("--help", "-h")]
    if not wanted or head[0] in ("--help", "-h"):
        return argv  # no flag, or `voxshield --help`, which fire answers with the list of commands
    head = [arg for arg in head if arg not in ("--help", "-h")]
    return head + (tail + ["--help"] if tail else ["--", "--help"])


def _writable(path: Path) -> bool:
    """Whether ``path`` can be created or written (the nearest existing folder is writable)."""
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


class VoxShield:
    """
    VoxShield: train the noise generator, publish a protected ("unlearnable") copy of a 3D segmentation
    dataset, evaluate it, report on it, verify it and export the bundle to the MONAI model zoo.

    Commands: protect, train, evaluate, report, verify, regrid, export; `voxshield COMMAND --help` for each.
    Every command that runs a workflow takes --bundle flare (abdominal CT, the default) or brats
    (multi-parametric brain MRI), and passes any extra --key value on as a bundle config override
    (e.g. --epochs 30, --eps 0.0157, --patch_size "[64,64,32]", "--generator_def#channels" "[16,32,64,128]").
    """

    # ---- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _run(workflow: str, name: str, overrides: dict) -> None:
        from monai.bundle import run

        from custom.bundle_utils import config_files

        locate_bundle(name)
        run(workflow, config_file=config_files(name, workflow), **overrides)

    @staticmethod
    def _paths(overrides: dict, **paths) -> dict:
        """Add the given folder options (stringified: fire turns `--x 2024` into an int) to overrides."""
        for key, value in paths.items():
            if value is not None:
                overrides[key] = str(value)
        return overrides

    @staticmethod
    def _require(name: str, **options) -> None:
        """An installed bundle folder is site-packages: no demo data, models or outputs can go there."""
        installed = locate_bundle(name).parent.parent == Path(__file__).resolve().parent
        missing = [f"--{key}" for key, value in options.items() if value is None]
        if installed and missing:
            raise CLIError(f"{' and '.join(missing)} required (the installed bundle has no demo data or models folder).")

    # ---- commands ----------------------------------------------------------------------------
    def train(self, dataset_dir=None, ckpt_dir=None, bundle="flare", **overrides):
        """
        Train the generator: writes CKPT/generator.pt, CKPT/surrogate.pt, CKPT/training_config.json and
        TensorBoard logs in CKPT/logs (or --log_dir).

        Args:
            dataset_dir: the labelled dataset (MSD, nnU-Net v2, BraTS19 or FLARE21 layout); default: the bundle's demo data.
            ckpt_dir: where the checkpoints go; default: the bundle's models/ folder.
            bundle: flare or brats.
            overrides: any train.json key, e.g. --epochs 100 --eps 0.0157 --lambda_isc 0.2 --patch_size "[64,64,32]".
        """
        name = bundle_name(bundle)
        self._require(name, dataset_dir=dataset_dir, ckpt_dir=ckpt_dir)
        overrides = self._paths(overrides, dataset_dir=dataset_dir, ckpt_dir=ckpt_dir)
        if ckpt_dir is not None and "log_dir" not in overrides:
            overrides["log_dir"] = str(Path(str(ckpt_dir)) / "logs")
        self._run("training", name, overrides)

    def protect(self, dataset_dir=None, ckpt_dir=None, output_dir=None, bundle="flare", **overrides):
        """
        Publish the protected copy of a dataset in OUTPUT_DIR, with its voxshield_manifest.json.
        When CKPT holds no checkpoint of the method (generator.pt for VoxShield, surrogate.pt for the
        surrogate-based baselines), fits it first (same options; --epochs sets its length).
        --method voxshield|em|tap|lsp|sep|pue|umed|random chooses the method (default voxshield).

        Args:
            dataset_dir: the labelled dataset; default: the bundle's demo data.
            ckpt_dir: the folder with the checkpoint (fitted into it when absent); default: the bundle's models/.
            output_dir: the protected copy (must not exist, or --overwrite true); default: <bundle>/demo_protected.
            bundle: flare or brats.
            overrides: any train.json / protect.json key, e.g. --overwrite true --window_size "[96,96,64]" --epochs 100.
        """
        # Each case is written on a second thread while the generator runs on the next. OpenMP's idle
        # workers spin between torch's parallel regions and take that thread's core (la_mri on 2 cores: each
        # case took 34-42% less time with it); libgomp reads the policy once, when torch is first imported.
        # A fit that runs first because the checkpoint is missing runs under it too (15-30% slower per step).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        name = bundle_name(bundle)
        self._require(name, dataset_dir=dataset_dir, ckpt_dir=ckpt_dir, output_dir=output_dir)
        folder = locate_bundle(name)
        from custom.protectors import METHODS  # torch: imported only when a command runs

        method = str(overrides.get("method", "voxshield"))
        if method not in METHODS:
            raise CLIError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        file_name = METHODS[method].checkpoint_name
        checkpoint = Path(str(overrides.get("checkpoint") or Path(str(ckpt_dir or folder / "models")) / str(file_name)))
        if file_name is not None and not checkpoint.is_file():
            if "checkpoint" in overrides:
                raise CLIError(f"{checkpoint}: {method} checkpoint not found.")
            if not _writable(checkpoint.parent):
                raise CLIError(f"{checkpoint.parent}: no {file_name} here and the folder is not writable; pass --ckpt_dir.")
            print(f"voxshield: no {file_name} in {checkpoint.parent}: fitting {method} first.", flush=True)
            self.train(dataset_dir=dataset_dir, ckpt_dir=ckpt_dir, bundle=bundle, **overrides)
        overrides = self._paths(overrides, dataset_dir=dataset_dir, ckpt_dir=ckpt_dir, output_dir=output_dir)
        self._run("protect", name, overrides)

    def evaluate(self, train_dir=None, test_dir=None, output_dir=None, bundle="flare", **overrides):
        """
        Train a victim segmenter on TRAIN_DIR (clean or protected) and score it on clean held-out cases
        of TEST_DIR; writes OUTPUT_DIR/results.json and results.md.

        Args:
            train_dir: the training data (a protected copy, or the clean dataset for the reference run).
            test_dir: the clean dataset whose `test` list (or --test_list "['id',...]") is scored; default: train_dir.
            output_dir: where the results go.
            bundle: flare or brats.
            overrides: any evaluate.json key, e.g. --victim unet --epochs 100 --test_list "['case_a']".
        """
        name = bundle_name(bundle)
        self._require(name, train_dir=train_dir, output_dir=output_dir)
        self._run("evaluate", name, self._paths(overrides, train_dir=train_dir, test_dir=test_dir, output_dir=output_dir))

    def report(self, results=None, output_dir=None, bundle="flare", **overrides):
        """
        Turn evaluation results into the paper's tables (tables.md, report.json) and, given
        --clean_dir and --protected_dir, the perturbation and comparison figures.

        Args:
            results: a results folder or file, or a list of them: "['RESULTS_1','RESULTS_2']".
            output_dir: where the report goes.
            bundle: flare or brats.
            overrides: any report.json key, e.g. --clean_dir CLEAN --protected_dir PROTECTED.
        """
        name = bundle_name(bundle)
        self._require(name, results=results, output_dir=output_dir)
        if results is not None:
            overrides["results"] = [str(item) for item in results] if isinstance(results, (list, tuple)) else [str(results)]
        self._run("report", name, self._paths(overrides, output_dir=output_dir))

    def verify(self, source=None, protected=None):
        """
        Check a protected copy against its source, independently of protect's code: manifest checksums,
        byte-identical labels and other files, identical headers, dtype, shape and affine, untouched
        voxels outside the ROI, the per-channel bound, and nothing added or missing. Prints one line per
        failed check (naming the file) and exits 1, or prints "verified N cases" and exits 0.

        Args:
            source: the original dataset.
            protected: the protected copy (holding voxshield_manifest.json).
        """
        from custom.verify import print_verdict, verify_copy

        if source is None or protected is None:
            raise CLIError("verify needs --source DATA and --protected OUT.")
        failures, cases = verify_copy(Path(str(source)), Path(str(protected)))
        code = print_verdict(failures, cases, Path(str(source)), Path(str(protected)))
        if code:
            sys.exit(code)

    def regrid(self, source=None, output=None, grid=160, normalisation="zscore", layout="auto",
               lists=("training", "test")):
        """
        Write a copy of a labelled dataset in the authors' evaluation form: an MSD dataset whose volumes are
        all resized to GRID^3 (trilinear images, nearest-neighbour labels, the physical extent kept) and whose
        images are float32 in [0, 1]; protect, evaluate and report read it with normalisation "none".

        Args:
            source: the labelled dataset (MSD, nnU-Net v2, BraTS19 or FLARE21 layout); only read.
            output: the new dataset folder; must not exist nor be inside the source.
            grid: the cube's size (160 in the authors' code), or "[H,W,D]".
            normalisation: zscore (mean +- 5 std of the non-zero voxels, the authors' mapping), mri, ct, none or auto.
            layout: auto, msd, nnunetv2, brats or flare.
            lists: the dataset.json lists to copy, e.g. "['training']"; each case keeps its list.
        """
        from custom.data import REGRID_RECORD
        from custom.regrid import regrid_dataset

        if source is None or output is None:
            raise CLIError("regrid needs --source DATA and --output OUT.")
        lists = [lists] if isinstance(lists, str) else [str(name) for name in lists]  # fire: --lists training
        written = regrid_dataset(Path(str(source)), Path(str(output)), grid, str(normalisation), str(layout), lists)
        record = json.loads((written / "dataset.json").read_text())[REGRID_RECORD]
        left_out = len(record["unlabelled_images_left_out"])
        print(f"voxshield: wrote {written}" + (f"; left out {left_out} unlabelled image(s)" if left_out else ""))

    def export(self, ckpt_dir=None, output=None, bundle="flare", url="", overwrite=False):
        """
        Write a self-contained MONAI model-zoo bundle zip (unpacks to voxshield_<bundle>/ with configs,
        the custom package, models/generator.pt, docs, LICENSE and large_files.yml).

        Args:
            ckpt_dir: the folder with the trained generator.pt (and training_config.json); default: the bundle's models/.
            output: the zip to write; default: voxshield_<bundle>-<version>.zip in the working directory.
            bundle: flare or brats.
            url: where the published generator.pt will be downloadable (recorded in large_files.yml).
            overwrite: replace an existing zip.
        """
        from custom.bundle_utils import as_bool
        from custom.zoo import export_bundle

        name = bundle_name(bundle)
        folder = locate_bundle(name)
        written = export_bundle(
            folder, name, Path(str(ckpt_dir)) if ckpt_dir is not None else folder / "models",
            Path(str(output)) if output is not None else None, url=str(url), overwrite=as_bool(overwrite, "overwrite"),
        )
        print(f"voxshield: wrote {written}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``voxshield`` console script."""
    import fire

    from custom.nifti_io import VoxShieldInputError

    args = _help_flag_to_fire(list(sys.argv[1:] if argv is None else argv))
    try:
        fire.Fire(VoxShield(), command=args, name="voxshield")
    except CLIError as error:
        print(f"voxshield: error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        # bad input surfaces wrapped by MONAI's config resolver: one line naming the file, as
        # `python -m monai.bundle run` prints it (custom.bundle_utils.brief_input_errors)
        cause = error
        while cause is not None and not isinstance(cause, VoxShieldInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"voxshield: error: {cause}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
