"""`python -m planner.profile` (see `planner.profile.main` for the flags)."""

from planner.profile.main import main

raise SystemExit(main())
