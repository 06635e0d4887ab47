"""`python -m planner`: see planner.main."""

from planner.main import main

raise SystemExit(main())
