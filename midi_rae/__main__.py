"""`python -m midi_rae` runs the command line interface."""
from midi_rae.cli import main

raise SystemExit(main())
