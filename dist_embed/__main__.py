"""``python -m dist_embed train|mine ...``: one worker of a job, as torchrun, accelerate, srun, Ray
or our launchers start it (``dist_embed.commands``); the user's command is ``dist-embed``."""
import sys

from .commands import main

sys.exit(main())
