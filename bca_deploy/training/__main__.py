"""``python -m bca_deploy.training {train,evaluate} ...``: the entry point ``torchrun`` can launch.

    torchrun --nproc_per_node 2 -m bca_deploy.training train --model DIR --data train.tsv \\
        --eval-data heldout.tsv --out runs/sst2 --block-size 128

The commands are the very ones of ``bca-deploy train`` / ``bca-deploy evaluate`` (same options, same
output; see :mod:`bca_deploy.training.cli`). Only rank 0 prints and writes. Errors in the input are printed
as one message, exit code 2.
"""

from .cli import module_main

if __name__ == "__main__":
    module_main()
