"""``python -m sim``: the researchers' simulator's command (the same as ``gonka-p2p sim``)."""

import sys

from sim.command import main

sys.exit(main())
