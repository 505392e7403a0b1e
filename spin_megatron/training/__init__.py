"""The training loop: ``trainer`` (the SPIN step), ``updates`` (a rollout batch's optimizer steps),
``minibatch``, ``overlap`` (rollout generated while the last step trains), ``validation``, ``policy`` (policy and
reference models, optimizer, schedule), ``checkpoint`` and ``optim_state``, ``preemption``, ``metrics``."""
