"""`python -m hippos ...` (and `torchrun --nproc_per_node N -m hippos train ...`): the `hippos` command."""

import sys

from .cli import main

sys.exit(main())
