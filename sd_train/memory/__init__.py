"""The memory plan: per-rank device and host peaks predicted before training (sd_train.memory.build,
torch-free), checked at startup, with the training step's own peak estimated on fake tensors
(sd_train.memory.estimate, torch) and cached (sd_train.memory.record)."""
