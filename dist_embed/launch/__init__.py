"""Launchers: everything that starts dist_embed workers. Installed as ``dist_embed.launch``.

- ``local``: ``dist-embed train --nproc N`` (and ``--nnodes`` with one launcher per node);
- ``slurm``: ``dist-embed submit slurm`` renders ``train.sbatch`` and submits it;
- ``ray``: ``dist-embed submit ray`` runs the workers under Ray Train;
- accelerate: ``accelerate launch --config_file configs/accelerate/<name>.yaml -m dist_embed train ...``
  (accelerate starts the processes; they join the process group like any other launcher's).

Every launcher starts the same worker entry point (``dist_embed.engine.worker.run_worker``); the worker
library (``dist_embed`` outside this package) never imports a launcher.
"""
