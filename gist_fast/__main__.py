"""`python -m gist_fast ...` is the `gist-fast` command (torchrun: `torchrun ... -m gist_fast train ...`)."""
import sys

from gist_fast.cli import main

sys.exit(main())
