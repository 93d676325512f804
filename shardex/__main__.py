"""`python -m shardex` runs the command line."""

import sys

from shardex.cli import main

sys.exit(main())
