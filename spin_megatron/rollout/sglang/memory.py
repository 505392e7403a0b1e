"""What each server's memory saver has released, tracked per server and kept on the server itself.

SGLang 0.5.23 (``managers/scheduler_components/weight_updater.py``) keeps the released regions in the scheduler
(``offload_tags``) and reports them nowhere; resuming a region that is not released raises ``KeyError`` in the
scheduler, which SIGQUITs the server, and generating on released memory runs on unmapped GPU memory. So the
trainer tracks, per server, what it released, and writes it into the server's weight version
(``/update_weight_version``, read back from ``/model_info``; see ``protocol.memory_stamp``):

- a release or resume that fails on one server leaves the others' state right (each server's is updated when
  its own request succeeds);
- a new engine attached to the same servers (after a supervisor restart, or a trainer resumed after a crash)
  starts from what the servers say, not from "all awake";
- a server restarted by someone else starts with its own weight version, i.e. nothing released: before each
  resume the state is read back, so a tag it no longer holds released is never resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from spin_megatron.rollout.sglang.protocol import (
    SGLangServerError,
    memory_payload,
    memory_stamp,
    parse_memory_stamp,
    update_weight_version_payload,
)
from spin_megatron.rollout.sglang.server import HttpClient

Action = Callable[[str], None]


class ServerMemory:
    """Released memory-saver regions of each server (``released[url]``), read from and written to the servers."""

    def __init__(self, client: HttpClient, pool: ThreadPoolExecutor, urls: Sequence[str]):
        self.client, self.pool, self.urls = client, pool, list(urls)
        self.released: dict[str, set[str]] = {url: set() for url in self.urls}
        self._base_version: dict[str, str] = {url: "default" for url in self.urls}

    def asleep(self) -> dict[str, list[str]]:
        """The servers that hold released memory, with the regions."""
        return {url: sorted(tags) for url, tags in self.released.items() if tags}

    def load(self) -> None:
        """Read every server's state (at start: what an earlier trainer left released)."""
        self._each(self.urls, self._read)

    def release(self, tags: Sequence[str]) -> None:
        """POST /release_memory_occupation for the ``tags`` each server still holds; raise after all answered."""

        def release_one(url: str) -> None:
            wanted = [tag for tag in tags if tag not in self.released[url]]
            if wanted:
                self.client.post_json(url, "/release_memory_occupation", memory_payload(wanted))
                self.released[url] |= set(wanted)
                self._write(url)

        self._each(self.urls, release_one)

    def resume(self, tags: Sequence[str]) -> None:
        """POST /resume_memory_occupation on each server for those of ``tags`` it has released, as it says now."""

        def resume_one(url: str) -> None:
            self._read(url)
            held = [tag for tag in tags if tag in self.released[url]]
            if held:
                self.client.post_json(url, "/resume_memory_occupation", memory_payload(held))
                self.released[url] -= set(held)
                self._write(url)

        self._each([url for url in self.urls if self.released[url] & set(tags)], resume_one)

    def _read(self, url: str) -> None:
        response = self.client.request("GET", url, "/model_info")
        if response.status_code != 200:
            raise SGLangServerError(f"{url}/model_info answered HTTP {response.status_code}")
        self._base_version[url], self.released[url] = parse_memory_stamp(
            response.json().get("weight_version")
        )

    def _write(self, url: str) -> None:
        stamp = memory_stamp(self._base_version[url], self.released[url])
        self.client.post_json(url, "/update_weight_version", update_weight_version_payload(stamp))

    def _each(self, urls: Sequence[str], action: Action) -> None:
        """``action(url)`` for every server at once; every one runs to its end, then the first failure raises."""
        errors = []
        for future in [self.pool.submit(action, url) for url in urls]:
            try:
                future.result()
            except SGLangServerError as exc:
                errors.append(exc)
        if errors:
            more = f" (and {len(errors) - 1} more server(s) failed)" if len(errors) > 1 else ""
            raise SGLangServerError(f"{errors[0]}{more}") from errors[0]
