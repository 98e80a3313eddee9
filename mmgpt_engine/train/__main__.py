"""`deepspeed --module mmgpt_engine.train` and `python -m mmgpt_engine.train` (see cli.py)."""
from .cli import main

raise SystemExit(main())
