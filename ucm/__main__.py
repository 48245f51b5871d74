from ucm.cli import main

raise SystemExit(main())
