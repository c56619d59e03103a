"""``python -m finetune_flows.flows.cli``."""

from finetune_flows.flows.cli.main import main

raise SystemExit(main())
