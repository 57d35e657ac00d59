"""``python -m dist_embed ...`` (what ``accelerate launch -m dist_embed train ...`` runs): the CLI."""
import sys

from .cli import main

sys.exit(main())
