"""A bounded, thread-safe, content-keyed cache of encoded prompt sets."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch


def content_key(*tensors: torch.Tensor, extra: str = "") -> str:
    """A SHA-256 over the bytes, shapes and dtypes of `tensors` plus `extra`."""
    digest = hashlib.sha256(extra.encode())
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


class PromptCache:
    """Least-recently-used map from content keys to encoded prompt states (anything with nbytes()),
    bounded in bytes."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get_or_create(self, key: str, create: Callable[[], Any]) -> Any:
        """The cached state for `key`, computing and storing it with `create` on a miss.

        Threads asking for the same missing key wait for one computation instead of repeating it.
        """
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            key_lock = self._pending.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._entries:  # computed by another thread while this one waited
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key]
            try:
                state = create()
            except BaseException:
                with self._lock:
                    self._pending.pop(key, None)
                raise
            with self._lock:
                self.misses += 1
                self._entries[key] = state
                self._entries.move_to_end(key)
                self._pending.pop(key, None)
                self._evict()
            return state

    def _evict(self) -> None:
        total = sum(e.nbytes() for e in self._entries.values())
        while len(self._entries) > 1 and total > self.max_bytes:
            _, oldest = self._entries.popitem(last=False)
            total -= oldest.nbytes()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
