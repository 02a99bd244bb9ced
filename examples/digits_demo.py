"""The end-to-end demo: train on scikit-learn's digits, prune with APIB, fine-tune, export, benchmark.

    python examples/digits_demo.py [--flops-target 0.48] [--epochs 12] [--finetune-epochs 6]

Same as `apib-fx demo`.
"""
import sys

from apib_fx.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
