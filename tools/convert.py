"""`python tools/convert.py ...` — the same as `spin-convert ...` (see spin_megatron/convert.py)."""

import sys

from spin_megatron.convert import main

if __name__ == "__main__":
    sys.exit(main())
