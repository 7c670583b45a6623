"""Offline commands (`sd-train <command>`), one module each; the training runtime never imports them:

- `prepare`: `prepare-emoji` / `prepare`, write webdataset shards from the Twemoji set or a folder.
- `tiny_sd`: `build-tiny`, the tiny offline SD model folder.
- `precompute`: `precompute`, encode shards once into latent + text-embedding shards.
- `sweep`: `sweep`, expand a sweep file into runs, locally or under SLURM.
- `quality`: `quality`, the EMA quality comparison of the demo.
- `posthoc`: `posthoc`, reconstruct EMAs of any length from a run's post-hoc snapshots.
- `config_doc`: `config-doc`, write the config reference docs/config.md from the schema's docstrings.
"""
