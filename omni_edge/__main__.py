import sys

from omni_edge.cli import main

sys.exit(main())
