from hetgraph.bench import main

raise SystemExit(main())
