"""Planning a run before it starts (``spin-plan``, and the trainer's start-of-run check on GPU): per-GPU memory
(``memory``: the estimate; ``counting``, ``workload``: its terms), what to change when it does not fit (``fit``),
and what each scaling option buys (``scaling``)."""
