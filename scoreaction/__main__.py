import sys

from scoreaction.cli import main

sys.exit(main())
