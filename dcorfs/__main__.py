from dcorfs.cli import main

raise SystemExit(main())
