"""Launchers: everything that starts dist_embed workers (local --nproc, Slurm, Ray; accelerate and
torchrun start ``-m dist_embed train`` themselves), all through the one worker entry, engine.worker."""
