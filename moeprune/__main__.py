"""``python -m moeprune``: the ``moeprune`` command line."""

import sys

from moeprune.cli import main

sys.exit(main())
