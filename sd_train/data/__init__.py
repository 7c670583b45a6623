"""The training data path, one concern per module (import the module you need; nothing is re-exported here):

- `sources`: shard specs (`data.*_shards`) -> URLs, and the epoch-mode shard-count check.
- `tar`: the webdataset tar reader (members -> raw samples) and the one tar member writer.
- `bad_input`: bad-input categories, per-worker counts, the bad-share check (raises `BadDataError`).
- `filters`: metadata filters (`data.filters`), judged from a sample's `.json` before any decode.
- `decode`: image decoding and geometry, stacking, and the one uint8 -> [-1, 1] conversion.
- `precomputed`: precomputed latent shards, training side (decode, stack, config check, posterior draw).
- `stream`: `ShardStream`, one rank's deterministic, resumable per-worker stream.
- `loader`: `TrainLoader` (positions, rotation, state), `build_train_loader`, `val_samples`.
"""
