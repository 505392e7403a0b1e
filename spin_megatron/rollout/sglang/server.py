"""SGLang server processes and HTTP plumbing: launch or attach, wait for /health, talk JSON, shut down.

Every launched process (servers, router) starts in its own session, so terminating it signals its whole
process group: SGLang forks scheduler and detokenizer processes, and killing only the parent would orphan them
(and their GPU memory).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from spin_megatron.errors import UserError
from spin_megatron.ports import pick_free_port, wait_port_free
from spin_megatron.rollout.sglang.config import SGLangConfig, engine_urls
from spin_megatron.rollout.sglang.protocol import (
    SGLangServerError,
    build_router_command,
    build_server_command,
    build_server_env,
    snippet,
)

HEALTH_POLL_S = 0.5
LINUX = sys.platform.startswith(
    "linux"
)  # die_with_parent needs prctl; elsewhere the actor's terminate() only
LOG_TAIL_LINES = 40
PORT_RELEASE_WAIT_S = 10.0  # how long a port may stay taken by a server that was just stopped
ATTACHED_REFUSED_S = 5.0  # how long an attached server may refuse connections before that is an error


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``). A failure raises,
    and Popen reports it in the parent: a server that could outlive its owner is not started silently."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG = 1
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")


class PortTakenError(SGLangServerError, UserError):
    """A port a launched server or router needs is taken: one line at start-up, a failed restart later."""


class ServerStartError(SGLangServerError, UserError):
    """A server (or router) that cannot start, died before it was healthy, never became healthy, or is attached
    and refuses connections: one line naming its log file or URL (a traceback would add nothing)."""


class ServerRefused(SGLangServerError):
    """Nothing listens at the server's address (connection refused)."""


def _refused(exc: BaseException | None, depth: int = 0) -> bool:
    """Whether ``exc`` (a requests error) comes from a refused connection, however deeply urllib3 wrapped it."""
    if exc is None or depth > 6:
        return False
    if isinstance(exc, ConnectionRefusedError):
        return True
    inner = [a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)]
    inner += [getattr(exc, "reason", None), exc.__cause__, exc.__context__]
    return any(_refused(e, depth + 1) for e in inner if isinstance(e, BaseException))


class ManagedProcess:
    """A child process in a new session whose stdout and stderr go to ``log_path``.

    ``die_with_parent``: the child gets SIGKILL when its parent dies (a Ray actor killed with its job must not
    leave its server behind; SGLang's own subprocesses watch their parent the same way). The parent must be
    the long-lived main thread: Linux sends the signal when the creating *thread* exits.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        die_with_parent: bool = False,
    ):
        self.name = name
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    list(command), env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                    preexec_fn=_die_with_parent if die_with_parent and LINUX else None,
                )  # fmt: skip
            except OSError as exc:  # no such interpreter, not executable
                raise ServerStartError(
                    f"cannot start {name}: {command[0]}: {exc.strerror or exc} (python_executable must be a "
                    "Python with SGLang installed)"
                ) from None

    @property
    def pid(self) -> int:
        return self._popen.pid

    def exit_code(self) -> int | None:
        return self._popen.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.is_file():
            return "(no log file)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def describe(self) -> str:
        return f"{self._state()}; last lines of {self.log_path}:\n{self.log_tail()}"

    def summary(self) -> str:
        """One line: the state, the log file and its last line."""
        return f"{self._state()}; its log: {self.log_path} (last line: {snippet(self.log_tail(1), 200)})"

    def _state(self) -> str:
        code = self.exit_code()
        return f"{self.name} (pid {self.pid}) " + (
            "still running" if code is None else f"exited with code {code}"
        )

    def terminate(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL to whatever is left after ``grace_s``."""
        self._signal_group(signal.SIGTERM)
        try:
            self._popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self._popen.wait(timeout=grace_s)
        # The leader may exit before its children do; they share its group id, so this reaches them too.
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._popen.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone already: nothing left to stop


class HttpClient:
    """JSON over HTTP with errors that name the server, the endpoint, the status and a body snippet."""

    def __init__(self, *, timeout_s: float, pool_size: int):
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        self.describe_failure: Callable[[str], str] = lambda url: ""
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Servers are addressed directly; an HTTP(S)_PROXY in the environment must not reroute them.
            session.trust_env = False
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def request(
        self, method: str, url: str, endpoint: str, payload: Any = None, *, timeout_s: float | None = None
    ) -> requests.Response:
        """The raw response, whatever its status; transport failures become :class:`SGLangServerError`."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self._session().request(method, url + endpoint, json=payload, timeout=timeout)
        except requests.Timeout as exc:
            raise SGLangServerError(
                f"{url}{endpoint}: no answer within {timeout:g} s (raise rollout.sglang.request_timeout_s if "
                f"the server is just slow). {self.describe_failure(url)}".rstrip()
            ) from exc
        except requests.ConnectionError as exc:
            error = ServerRefused if _refused(exc) else SGLangServerError
            raise error(
                f"{url}{endpoint}: connection failed or dropped ({type(exc).__name__}); the server is not "
                f"running or crashed while handling the request. {self.describe_failure(url)}".rstrip()
            ) from exc

    def post_json(
        self, url: str, endpoint: str, payload: Any = None, *, timeout_s: float | None = None
    ) -> Any:
        """POST ``payload``; the decoded JSON of a 2xx answer (``None`` for an empty or ``null`` body)."""
        response = self.request("POST", url, endpoint, payload, timeout_s=timeout_s)
        if not 200 <= response.status_code < 300:
            raise SGLangServerError(
                f"{url}{endpoint} answered HTTP {response.status_code}: {snippet(response.text)} "
                f"{self.describe_failure(url)}".rstrip()
            )
        if not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise SGLangServerError(
                f"{url}{endpoint}: the answer is not JSON: {snippet(response.text)}"
            ) from exc


CheckResponse = Callable[[str, str, Any], None]  # (endpoint, url, body) -> None or raise


def submit_to_all(
    client: HttpClient, pool: ThreadPoolExecutor, urls: Sequence[str], endpoint: str, payloads: Sequence[Any]
) -> list[Future]:
    """Start ``POST urls[i] + endpoint`` with ``payloads[i]`` for every server at once."""
    return [
        pool.submit(client.post_json, url, endpoint, payload)
        for url, payload in zip(urls, payloads, strict=True)
    ]


def collect_all(
    urls: Sequence[str], futures: Sequence[Future], endpoint: str, check: CheckResponse | None = None
) -> list[Any]:
    """Wait for EVERY request (none is left running behind an error), then raise the first failure."""
    bodies, errors = [], []
    for url, future in zip(urls, futures, strict=True):
        try:
            body = future.result()
            if check is not None:
                check(endpoint, url, body)
            bodies.append(body)
        except SGLangServerError as exc:
            errors.append(exc)
    if errors:
        more = f" (and {len(errors) - 1} more server(s) failed)" if len(errors) > 1 else ""
        raise SGLangServerError(f"{errors[0]}{more}") from errors[0]
    return bodies


def post_to_all(
    client: HttpClient,
    pool: ThreadPoolExecutor,
    urls: Sequence[str],
    endpoint: str,
    payloads: Sequence[Any],
    check: CheckResponse | None = None,
) -> list[Any]:
    return collect_all(urls, submit_to_all(client, pool, urls, endpoint, payloads), endpoint, check)


def wait_until_healthy(
    client: HttpClient,
    url: str,
    *,
    timeout_s: float,
    process: ManagedProcess | None = None,
    what: str = "server",
) -> None:
    """Poll ``GET url/health`` until it answers 200. Fails in one line (:class:`ServerStartError`) when
    ``process`` exits (naming its log), after ``timeout_s``, or, for an attached server (no ``process``), when
    connections are still refused after :data:`ATTACHED_REFUSED_S`: nothing listens there, which is not a
    server that is still loading (that one answers 503, or not at all, and is waited for)."""
    start = time.monotonic()
    deadline = start + timeout_s
    last = "no answer yet"
    while True:
        if process is not None and process.exit_code() is not None:
            raise ServerStartError(
                f"SGLang {what} at {url} died before becoming healthy: {process.summary()}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            response = client.request("GET", url, "/health", timeout_s=max(0.1, min(5.0, remaining)))
        except ServerRefused as exc:
            if process is None and time.monotonic() - start >= min(ATTACHED_REFUSED_S, timeout_s):
                raise ServerStartError(
                    f"SGLang {what} at {url} refuses connections (nothing listens there): start it first, or "
                    "fix rollout.sglang.urls"
                ) from exc
            last = "connection refused"
        except SGLangServerError as exc:
            last = str(exc).splitlines()[0]  # slow to answer: remembered for the timeout message
        else:
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {snippet(response.text, 120)}"
        time.sleep(max(0.0, min(HEALTH_POLL_S, deadline - time.monotonic())))
    detail = f" {process.summary()}" if process is not None else ""
    raise ServerStartError(
        f"SGLang {what} at {url} did not become healthy within {timeout_s:g} s (last: {last}); raise "
        f"rollout.sglang.health_timeout_s if it is still loading.{detail}"
    )


class ServerFleet:
    """The servers (launched or attached) and the optional router; ``urls`` address the servers themselves."""

    def __init__(self, config: SGLangConfig, *, colocated: bool, client: HttpClient):
        self.config = config
        self.colocated = colocated
        self.client = client
        self.urls = engine_urls(config)
        self.router_url: str | None = None
        self.processes: dict[str, ManagedProcess] = {}
        self.log_dir = Path(config.log_dir) if config.log_dir else None

    @property
    def generate_urls(self) -> list[str]:
        return [self.router_url] if self.router_url else list(self.urls)

    def describe_failure(self, url: str) -> str:
        process = self.processes.get(url)
        return process.describe() if process is not None and process.exit_code() is not None else ""

    def start(self) -> None:
        """Launch (or attach to) every server, then the router; on any failure stop what was started."""
        try:
            if self.config.launches_servers:
                self._launch_servers()
            for url in self.urls:
                wait_until_healthy(
                    self.client, url, timeout_s=self.config.health_timeout_s, process=self.processes.get(url)
                )
            if self.config.use_router:
                self._launch_router()
        except BaseException:
            self.shutdown()
            raise

    def _logs(self) -> Path:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="spin_sglang_logs_"))
        return self.log_dir

    def _check_port(self, port: int, what: str, fix: str) -> None:
        """Refuse to launch onto a taken port: the launch would die, and a stale server still answering there
        would pass the health check in its place. A just-stopped server may hold its socket for a moment."""
        host = self.config.host
        if not wait_port_free(host, port, timeout_s=PORT_RELEASE_WAIT_S):
            raise PortTakenError(
                f"{what}: port {port} on {host} is in use (another SGLang server, a leftover of an earlier run, or "
                f"another program listens there); stop it, or {fix}"
            )

    def _launch_servers(self) -> None:
        fix = f"set rollout.sglang.base_port to the first of {len(self.urls)} free consecutive ports"
        for index in range(len(self.urls)):
            self._check_port(self.config.base_port + index, f"SGLang server {index}", fix)
        for index, url in enumerate(self.urls):
            command = build_server_command(self.config, index, colocated=self.colocated)
            env = build_server_env(self.config, index, os.environ, colocated=self.colocated)
            log = self._logs() / f"sglang_server_{index}.log"
            self.processes[url] = ManagedProcess(f"SGLang server {index}", command, env, log)

    def _launch_router(self) -> None:
        url = f"http://{self.config.host}:{self.config.router_port}"
        self._check_port(
            self.config.router_port, "sglang_router", "set rollout.sglang.router_port to a free port"
        )
        metrics = self.config.router_metrics_port or pick_free_port(self.config.host)
        command = build_router_command(self.config, self.urls, metrics_port=metrics)
        process = ManagedProcess("sglang_router", command, os.environ, self._logs() / "sglang_router.log")
        self.processes[url] = process
        wait_until_healthy(
            self.client, url, timeout_s=self.config.health_timeout_s, process=process, what="router"
        )
        self.router_url = url

    def shutdown(self) -> None:
        """Stop the router first (it would log every vanished server), then the servers. Idempotent."""
        for url in sorted(self.processes, key=lambda u: u in self.urls):
            self.processes[url].terminate()
        self.processes.clear()
        self.router_url = None
