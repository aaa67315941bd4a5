"""``python -m zooprune.cli``."""

import sys

from zooprune.cli import main

sys.exit(main())
