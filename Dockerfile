# sd-train GPU image: CUDA PyTorch + the project's pinned dependencies + this repository.
#
#   docker build -t sd-train .
#   docker run --gpus all --ipc=host \
#       -v "$PWD/data:/workspace/sd-train/data" -v "$PWD/models:/workspace/sd-train/models" \
#       -v "$PWD/runs:/workspace/sd-train/runs" sd-train
#   docker run ... sd-train --config_file launch/accelerate/gpu1node.yaml --num_processes 4 \
#       train.py --config configs/NAME.yaml output_dir=runs/x
#
# The entrypoint is `accelerate launch`, so the arguments are a launcher config, train.py and the
# sd-train config with its overrides. data/, models/ and runs/ are not in the image (.dockerignore):
# mount them. --ipc=host because DataLoader workers pass batches through /dev/shm, which Docker
# limits to 64 MB by default. Multi-node: add --network host --device /dev/infiniband --ulimit
# memlock=-1 --cap-add IPC_LOCK (see docs/launching.md and launch/cluster_env.sh).

# The base image carries torch 2.13.0 built for CUDA 12.6 with cuDNN 9, the version that
# requirements.txt and constraints.txt pin. Tag naming follows pytorch/pytorch's
# `<torch>-cuda<major.minor>-cudnn<major>-runtime`. CUDA 12.6 runs on any driver >= 525 (CUDA 12
# minor-version compatibility, so H100/H200 hosts as they are); for Blackwell GPUs take a
# cuda12.8-or-newer tag of the same torch version. Pin by digest too (`@sha256:...`) once the image
# has been pulled and checked, so a re-pushed tag cannot change the build.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/sd-train

# Dependencies first, in their own layer, so that editing the code does not reinstall them. Same
# files and flags as `make venv`: requirements.txt is the full lock, constraints.txt pins torch so
# that no dependency can replace it. The image's torch reports 2.13.0+cu126, which satisfies
# torch==2.13.0 (a local version label matches a pin without one), so pip keeps the CUDA build.
COPY requirements.txt constraints.txt ./
RUN python -m pip install --no-cache-dir -c constraints.txt -r requirements.txt

# The project itself: --no-deps, because everything it needs is installed above from the lock.
COPY . .
RUN python -m pip install --no-cache-dir --no-deps -e .

# One BLAS thread per rank: 8 ranks share the node's cores with their DataLoader workers.
# Offline hub: models are local folders (model.pretrained_path); never download at startup.
ENV OMP_NUM_THREADS=1 \
    HF_HUB_OFFLINE=1

ENTRYPOINT ["accelerate", "launch"]
CMD ["--config_file", "launch/accelerate/gpu1node.yaml", "train.py", "--config", "configs/demo.yaml"]
