"""Entry point for ``python -m lora_train``."""

import sys

from .cli import main

sys.exit(main())
