"""`python -m hf_plugins.demo`: the same as `hf-plugins demo`."""

import sys

from .run import main


sys.exit(main())
