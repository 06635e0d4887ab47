"""`python -m trident ...` is the `trident` command."""

from __future__ import annotations

import sys

from trident.cli import main

sys.exit(main())
