#!/bin/bash
# Environment for multi-node GPU jobs, sourced by launch/slurm/sd_train.sbatch before it starts the
# launchers (source it yourself in any other job script). Every variable is only set if the job has
# not set it already, so a site's own settings win. Each line says why it is there.

# --- memory ----------------------------------------------------------------------------------------
# FSDP2 allocates and frees the gathered blocks every step; expandable segments keep that from
# fragmenting the caching allocator into an out-of-memory on long runs.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# --- NCCL failures: fail loudly, and leave a record ---------------------------------------------------
# A collective that times out tears the process group down (the trainer exits non-zero and the job
# requeues) instead of hanging until the wall-clock limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
# The NCCL flight recorder: the last N collectives of every rank, dumped on a timeout, so a hang can be
# traced to the rank and the collective that diverged (read the dumps with `torchfrtrace`).
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# The dump is a file per rank with this prefix; node-local /tmp by default (point it at a shared
# folder that exists to collect every node's dumps in one place).
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-/tmp/nccl_trace_job${SLURM_JOB_ID:-0}_rank_}
# Print NCCL's transport choice once per rank at startup (IB or sockets?), warnings otherwise.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# --- InfiniBand -------------------------------------------------------------------------------------
# Leave these to NCCL's auto-detection unless the site says otherwise; the commented lines are the
# usual knobs, with what they do:
# export NCCL_IB_HCA=mlx5                 # which HCAs to use (a prefix matches mlx5_0, mlx5_1, ...)
# export NCCL_SOCKET_IFNAME=ib0,eth0      # the interface for NCCL's bootstrap (not the data path)
# export NCCL_IB_GID_INDEX=3              # RoCE: the GID of the RoCEv2 address
# export NCCL_NET_GDR_LEVEL=PHB           # GPUDirect RDMA up to this PCI distance
# export NCCL_CROSS_NIC=0                 # keep each ring on one NIC per rail (rail-optimised fabrics)
# Turning IB off (NCCL_IB_DISABLE=1) falls back to TCP sockets: a 5-10x slower gradient all-reduce.
