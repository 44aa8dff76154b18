"""`python -m turbotune` → the CLI; bare, it runs the health check."""
import sys

from .cli import main

sys.exit(main())
