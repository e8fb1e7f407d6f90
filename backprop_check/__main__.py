from backprop_check.cli import main; raise SystemExit(main())
