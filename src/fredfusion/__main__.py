from fredfusion.cli import main

raise SystemExit(main())
