"""Helpers the tests share, and nothing else: no test module imports another test module.

- launch.py: start real multi-process jobs (ports, launcher command lines, environment, timeouts);
- spawn_ranks.py: start N ranks with torchrun's variables but without its agent (a script);
- runs.py: the 2-rank training runs of configs/test.yaml and how to read what they write;
- reference.py: independent references for what a run logs (an exported pipeline's loss);
- streams.py: data loaders over the committed shards, and reading batches and keys from them.
"""
