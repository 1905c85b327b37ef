#!/usr/bin/env python
"""Talk to a saved GPT-2 in the terminal; `--help` lists the flags, `/help` the commands.

All the logic is in `gpt2_demo.interactive` (nbs/11_interactive.ipynb); this file only starts it (as does the
`gpt2-chat` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # a checkout works without `pip install -e .`
from gpt2_demo.interactive import main

if __name__ == "__main__": sys.exit(main())
