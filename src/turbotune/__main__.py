"""`python -m turbotune` → the CLI; bare, it runs the health check."""
import sys

from turbotune.cli.main import main

sys.exit(main())
