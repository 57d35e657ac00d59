"""Launchers, above the worker library: the ``dist-embed`` command line, local and multi-node
processes (--nproc, --nnodes), Slurm and Ray. ``dist_embed`` never imports this package; every
launcher starts the one worker entry, ``dist_embed.engine.worker``."""
