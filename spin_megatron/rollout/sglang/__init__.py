"""The ``sglang`` rollout engine: SGLang servers launched (locally or on Ray) or attached to, driven over
SGLang's HTTP API, with weight sync over CUDA IPC / NCCL on GPU and file-system-shared tensors / gloo on CPU.

Tested against sglang 0.5.23 and sglang-router 0.3.2 (a real server on CPU in the test suite).

- ``config``: ``rollout.sglang.*`` and the pure decisions made from it (sync mode, transports, ports);
- ``protocol``: command lines, request payloads, response parsing (pure, no I/O);
- ``server``: processes, HTTP client, health, the fleet;
- ``ray``: the fleet placed by Ray actors;
- ``buckets``, ``weights``: weight sync (sessions, one payload per consumer rank, both transports);
- ``engine``: the :class:`~spin_megatron.rollout.protocol.RolloutEngine` the trainer drives;
- ``factory``: one engine per data-parallel replica (``rollout.engine=sglang``).
"""
