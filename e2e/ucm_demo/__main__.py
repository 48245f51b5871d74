from e2e.ucm_demo.run import main

raise SystemExit(main())
