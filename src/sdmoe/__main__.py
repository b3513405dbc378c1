from sdmoe.cli import main

raise SystemExit(main())
