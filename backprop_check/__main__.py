from backprop_check.console import main; raise SystemExit(main())
