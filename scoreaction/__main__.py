import os
import sys

from scoreaction.cli import main
from scoreaction.distributed import launched

code = main()
if launched():
    # Gloo's worker threads can abort the interpreter's finalisation ("terminate called without an active
    # exception", SIGABRT; pytorch/pytorch#179291) after the run has finished and written everything: end here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
