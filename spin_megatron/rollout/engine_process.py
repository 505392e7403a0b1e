"""A rollout engine in a process of its own (``rollout.hf_process=separate``).

The ``hf`` engine normally runs in the trainer's process, sharing its threads (and its fate). Here it runs in a
child process started with ``spawn``: the trainer's calls (``generate``, ``update_weights``, ``sleep``, ...) are
forwarded over a pipe and answered in order, so the protocol — and with the same weights, seed and thread count,
every sampled token — is the in-process engine's. What it buys:

- the engine has threads of its own (``rollout.hf_threads``), so on a CPU machine generation and training can run
  side by side, one core each, as SGLang servers do on their own GPUs;
- a crash in the engine (or the supervisor's timeout) takes down the child, not the trainer: the supervisor kills
  it and builds a new one, and the trainer re-syncs the weights.

Weights travel through a staging buffer in shared memory (:class:`_Staging`): the trainer copies a bucket into a
file in ``/dev/shm`` that both processes map, and sends only the names, dtypes, shapes and offsets; the child
copies from its mapping into the model. The trainer's own parameter storage never moves into shared memory under
Megatron's feet, and nothing depends on file-descriptor passing: the child maps the file by path, and the file is
unlinked as soon as it has (so a killed run leaves nothing in ``/dev/shm``; the memory lives while either maps
it). The buffer is as large as the largest bucket and grows when a larger one comes. The child gets SIGKILL when
the trainer dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import threading
import traceback
from collections.abc import Callable, Hashable, Iterable

import torch

from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.types import Sample

START_TIMEOUT_S = 300.0  # importing torch + transformers and building the model, on a loaded machine
SHUTDOWN_GRACE_S = 10.0


class EngineProcessError(RuntimeError):
    """The engine process died, did not start, or raised (its exception's text is in the message)."""


_ALIGN = 64  # bytes: every tensor starts aligned, so the child can view the bytes as its dtype


def _map(path: str, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the file (MAP_SHARED: both processes see the same pages)."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class _Staging:
    """The trainer's side of the shared staging buffer."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def write(self, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str | None, int, list]:
        """Copy a bucket into the buffer (a larger one first if it does not fit). Returns the new file's path
        (None: the child's mapping is current), the buffer's size and the tensors' (name, dtype, shape, start)."""
        named = [(name, tensor.detach()) for name, tensor in named]
        metas, offset = [], 0
        for name, tensor in named:
            metas.append((name, tensor.dtype, tuple(tensor.shape), offset))
            offset += tensor.numel() * tensor.element_size()
            offset += -offset % _ALIGN
        path = None
        if self.buffer is None or self.buffer.numel() < offset:
            fd, path = tempfile.mkstemp(prefix="spin-weights-", dir=_shm_dir())
            try:
                os.ftruncate(fd, max(offset, 1))
            finally:
                os.close(fd)
            self.buffer = _map(path, max(offset, 1))
        for (_, tensor), (_, dtype, shape, start) in zip(named, metas, strict=True):
            nbytes = tensor.numel() * tensor.element_size()
            self.buffer[start : start + nbytes].view(dtype).view(shape).copy_(tensor)
        return path, self.buffer.numel(), metas


def _read(buffer: torch.Tensor, metas: list) -> list[tuple[str, torch.Tensor]]:
    """The child's views of a bucket in its mapping (copied into the model by the engine)."""
    views = []
    for name, dtype, shape, start in metas:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        views.append((name, buffer[start : start + nbytes].view(dtype).view(shape)))
    return views


def _serve(conn, build: Callable[[], object], threads: int) -> None:
    """The child: build the engine, say ready, then answer (op, args, kwargs) messages until shutdown or EOF."""
    from spin_megatron.rollout.sglang.server import _die_with_parent

    _die_with_parent()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        engine = build()
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
        return
    conn.send(("ready", os.getpid()))
    staging = None  # the child's mapping of the trainer's staging buffer
    while True:
        try:
            op, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        try:
            if op == "update_weights":
                path, nbytes, metas = args
                if path is not None:
                    staging = _map(path, nbytes)
                args = (_read(staging, metas),)
            result = getattr(engine, op)(*args, **kwargs)
            reply = ("ok", result if op == "generate" else None)
        except BaseException as exc:  # answered, never dropped: the trainer decides what to do
            reply = ("error", _describe(exc))
        conn.send(reply)
        if op == "shutdown":
            return


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


class EngineProcess:
    """A RolloutEngine whose engine, ``build()``'s, lives in a child process. ``build`` must be picklable (a
    module-level function or a ``functools.partial`` of one): the child is spawned, not forked."""

    def __init__(
        self, build: Callable[[], object], *, threads: int = 0, start_timeout_s: float = START_TIMEOUT_S
    ):
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, build, threads), name="spin-rollout-engine", daemon=True
        )
        self._process.start()
        child.close()
        self._lock = threading.RLock()  # one call at a time; held while a call waits for its answer
        self._staging = _Staging()
        self.pid = self._process.pid
        if not self._conn.poll(start_timeout_s):
            self._kill()
            raise EngineProcessError(
                f"the rollout engine process (pid {self.pid}) did not start within {start_timeout_s:g} s"
            )
        status, payload = self._receive()
        if status != "ready":
            self._kill()
            raise EngineProcessError(
                f"the rollout engine process (pid {self.pid}) failed to start: {payload}"
            )

    # ----- the RolloutEngine protocol ------------------------------------------------------------------------
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, prompt_keys: list[Hashable] | None = None
    ) -> list[Sample]:
        return self._call("generate", prompt_ids, params, prompt_keys)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        with self._lock:  # the buffer is written only between calls (the child reads it during this one)
            path, nbytes, metas = self._staging.write(named_tensors)
            try:
                self._call("update_weights", path, nbytes, metas)
            except BaseException:
                self._staging.buffer = None  # the child may not have mapped it: the next call maps a new one
                raise
            finally:
                if path is not None:
                    os.unlink(path)  # mapped by both now (or the child is gone): the name is not needed

    def finish_weight_update(self) -> None:
        self._call("finish_weight_update")

    def sleep(self, *, release_weights: bool = True) -> None:
        self._call("sleep", release_weights=release_weights)

    def wake(self) -> None:
        self._call("wake")

    def shutdown(self) -> None:
        """Ask the child to stop; kill it if it is busy (a hung generate holds the pipe) or does not stop."""
        if self._process.is_alive() and self._lock.acquire(timeout=0.1):
            try:
                self._conn.send(("shutdown", (), {}))
                if self._conn.poll(SHUTDOWN_GRACE_S):
                    self._conn.recv()
            except (EOFError, OSError):
                pass  # it died on its own: nothing left to stop politely
            finally:
                self._lock.release()
        self._process.join(SHUTDOWN_GRACE_S if not self._process.is_alive() else 2.0)
        self._kill()
        self._conn.close()
        self._staging.buffer = None  # unmaps the trainer's side

    # ----- plumbing ------------------------------------------------------------------------------------------
    def _call(self, op: str, *args, **kwargs):
        with self._lock:
            try:
                self._conn.send((op, args, kwargs))
            except (OSError, ValueError) as exc:  # ValueError: the pipe was closed by shutdown()
                raise self._died(op) from exc
            status, payload = self._receive(op)
        if status == "error":
            raise EngineProcessError(f"rollout engine process (pid {self.pid}), {op}: {payload}")
        return payload

    def _receive(self, op: str = "start"):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died(op) from exc

    def _died(self, op: str) -> EngineProcessError:
        self._process.join(1.0)
        code = self._process.exitcode
        how = (
            "is gone"
            if code is None
            else f"exited with code {code}" + (" (killed)" if code and code < 0 else "")
        )
        return EngineProcessError(f"the rollout engine process (pid {self.pid}) {how} during {op}")

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(SHUTDOWN_GRACE_S)
