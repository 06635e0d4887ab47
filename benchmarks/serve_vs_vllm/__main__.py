"""`python -m benchmarks.serve_vs_vllm`: runs `main.main` with the command line's flags."""

from benchmarks.serve_vs_vllm.main import main

raise SystemExit(main())
