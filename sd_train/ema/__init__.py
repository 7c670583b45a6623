"""The EMA of the UNet weights, in one place.

- `plan`: the window plan (when the EMA starts, what share of it the pre-window weights keep) and
  its startup check; torch-free, so a bad config is refused before torch loads.
- `shadow`: the machinery every shadow of the weights shares: fp32 copies of this rank's pieces of
  each parameter, where the strategy's `EMALayout` says they live, updated with one foreach lerp
  and no collective.
- `sharded`: `ShardedEMA`, the late-start EMA.
- `posthoc` and `posthoc_math`: the post-hoc EMA (EDM2): power-function profiles, their
  snapshots, and the least-squares reconstruction of any EMA length from them.
- `contracts`: the `Shadow` and `EMALayout` Protocols that the checkpointer and the strategies'
  layouts (sd_train/parallel/fsdp.py, sd_train/parallel/deepspeed.py) are written against.

This package file imports nothing, so importing `sd_train.ema.plan` stays torch-free.
"""
