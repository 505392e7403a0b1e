"""``spin-train``: the SPIN / online-DPO trainer entry point (Hydra).

Not implemented yet: it lands with the trainer issue. Until then this exits with a clear message instead of
pretending to train.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "spin-train: error: the trainer is not implemented yet (it builds on the foundation that is here: "
        "spin-convert and the Megatron model). See README.md, section Status.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
