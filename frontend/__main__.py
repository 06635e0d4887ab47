"""`python -m frontend`: the OpenAI-compatible frontend (see `frontend.args` for flags)."""

from __future__ import annotations

from frontend.main import main

if __name__ == "__main__":
    main()
