from benchmarks.kv_connectors.main import main

raise SystemExit(main())
