"""Moved to ssl_lightning.cluster.sweep. Kept so that a job script rendered before the move, requeued
now, still ends with ``python -m ssl_lightning.sweep finish ...``."""
import sys

from ssl_lightning.cluster.sweep import main

if __name__ == "__main__":
    main(sys.argv[1:])
