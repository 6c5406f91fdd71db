from hetgraph.cli import main

raise SystemExit(main())
