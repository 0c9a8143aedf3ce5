from mgral.cli import main

raise SystemExit(main())
