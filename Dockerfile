# VoxShield: the `voxshield` command on CUDA.
#
#   docker build -t voxshield:0.1.0 .
#   docker run --rm --gpus all --ipc=host \
#       -v /path/to/dataset:/data:ro -v /path/to/results:/output \
#       voxshield:0.1.0 protect --bundle flare --dataset_dir /data --ckpt_dir /output/ckpt --output_dir /output/protected
#   docker run --rm -v /path/to/dataset:/data:ro -v /path/to/results:/output \
#       voxshield:0.1.0 verify --source /data --protected /output/protected
#
# Volumes: mount the source dataset read-only at /data (`:ro`; VoxShield never writes to its input)
# and a writable folder at /output for checkpoints, TensorBoard logs, the protected copy and reports.
# The container runs as the unprivileged user `voxshield` (uid 1000): /output must be writable by that
# uid, or run with `--user "$(id -u):$(id -g)"`.
# Shared memory: PyTorch data loaders and torchrun workers exchange tensors through /dev/shm, which
# Docker caps at 64 MB; run with `--ipc=host` (or e.g. `--shm-size=8g`) for training and multi-GPU runs.

# Must carry torch 2.13.0 (requirements.txt pins torch==2.13.0; the build checks it below and never
# reinstalls torch): the official PyTorch 2.13.0 CUDA 12.8 / cuDNN 9 runtime image.
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

LABEL org.opencontainers.image.title="voxshield" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="VoxShield: unlearnable protected copies of 3D medical segmentation datasets (MONAI bundles)" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/voxshield

# Dependencies first (a layer that survives code changes): requirements.txt without its torch line,
# with torch constrained to the base image's version so that no dependency can pull another torch.
COPY requirements.txt ./
RUN python -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else f'base image has torch {v}, requirements.txt pins 2.13.0')" \
    && grep -v -E '^[[:space:]]*torch[[:space:]]*(==|>=|<=|~=|$)' requirements.txt > /tmp/requirements-no-torch.txt \
    && grep -E '^[[:space:]]*torch[[:space:]]*==' requirements.txt > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -r /tmp/requirements-no-torch.txt -c /tmp/torch-constraint.txt \
    && rm /tmp/requirements-no-torch.txt /tmp/torch-constraint.txt

# The package (custom/ and the bundles' configs as package data) and the `voxshield` console script.
COPY pyproject.toml README.md LICENSE ./
COPY custom/ custom/
COPY configs/ configs/
COPY bundles/voxshield_flare/LICENSE bundles/voxshield_flare/
COPY bundles/voxshield_flare/configs/ bundles/voxshield_flare/configs/
COPY bundles/voxshield_flare/docs/ bundles/voxshield_flare/docs/
COPY bundles/voxshield_brats/LICENSE bundles/voxshield_brats/
COPY bundles/voxshield_brats/configs/ bundles/voxshield_brats/configs/
COPY bundles/voxshield_brats/docs/ bundles/voxshield_brats/docs/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && useradd --no-log-init --create-home --uid 1000 --shell /bin/bash voxshield \
    && mkdir -p /data /output \
    && chown voxshield:voxshield /output

# the `voxshield` user created above, by number so that Kubernetes' runAsNonRoot can check it
USER 1000:1000

# /data: the source dataset, mounted read-only; /output: everything VoxShield writes.
VOLUME ["/data", "/output"]

ENTRYPOINT ["voxshield"]
CMD ["--help"]
