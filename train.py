"""Train a continual sequence: `python train.py` or `torchrun --nproc-per-node N train.py [options]`.

See docs/TRAINING.md; `python train.py --help` lists presets and every config key.
"""
from mage.trainer import main

if __name__ == "__main__":
    main()
