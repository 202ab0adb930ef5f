"""`python -m launcher`: the same as the `ftlaunch` command."""
from launcher.cli import main

raise SystemExit(main())
