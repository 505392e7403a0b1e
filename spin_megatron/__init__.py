"""spin-megatron: SPIN (self-play fine-tuning) as iterative online DPO on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Megatron-Core announces every optional fast path it cannot use (apex, TE) at import, and its checkpointing
# calls deprecated torch APIs. These say nothing actionable; everything else still shows.
for _message in (
    r".*Apex is not installed.*",
    r".*Transformer Engine and Apex are not installed.*",
    r"full scope is deprecated.*",
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead.*",
):
    warnings.filterwarnings("ignore", message=_message)
