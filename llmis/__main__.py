from llmis.cli import main

raise SystemExit(main())
