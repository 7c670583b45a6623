"""Train a Stable Diffusion UNet. A thin entry point: everything lives in sd_train/.

python train.py --config configs/demo.yaml [section.key=value ...]
accelerate launch --config_file launch/accelerate/cpu2.yaml train.py --config configs/test.yaml
torchrun --nproc_per_node 8 train.py --config configs/sd2_base_256.yaml output_dir=runs/x
"""

import sys

from sd_train.entry import main

if __name__ == "__main__":
    sys.exit(main())
