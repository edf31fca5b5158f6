"""The host side of a paged KV cache: which pages are free, who uses which, and which hold a known prefix.

One `PagePool` per data shard. Page 0 is scratch: padding rows and padding tokens write there and nothing reads
it, so it is never handed out. A page has a reference count (the sequences reading it); it returns to the free
list when the count drops to zero, unless it holds a registered prefix.

Prefix cache: full pages of prompt tokens are registered in a trie keyed by their tokens, one level per page, so
a page is found only under the exact tokens before it. A later sequence whose tokens start the same way reads
those pages instead of computing them again (a group's samples, requests sharing a system prompt). A page is
registered when its sequence is admitted and becomes `ready` once its keys and values are written; a sequence
that would share a page still being written waits for it. Registered pages nobody reads stay cached until their
space is needed, least recently released first: a reader releases its pages last first, so the pages below a
page always go before it.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

SCRATCH_PAGE = 0


@dataclasses.dataclass(eq=False)
class PrefixNode:
    """A registered page: `tokens` is its content, `parent` the page before it (the root for the first)."""

    page: int
    tokens: tuple[int, ...]
    parent: "PrefixNode | None"
    ready: bool = False
    children: dict[tuple[int, ...], "PrefixNode"] = dataclasses.field(default_factory=dict)


class PagePool:
    """Pages 1 .. num_pages - 1 of one shard's cache; see the module docstring."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (page 0 is scratch), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low page numbers first
        self._refs = [0] * num_pages
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # unused registered pages
        self._root = PrefixNode(SCRATCH_PAGE, (), None, ready=True)
        self._nodes: dict[int, PrefixNode] = {}
        self.peak_in_use = 0

    @property
    def in_use(self) -> int:
        """Pages some sequence reads."""
        return self.num_pages - 1 - len(self._free) - len(self._cached)

    def available(self) -> int:
        """Pages `take` can hand out: free ones and cached ones nobody reads."""
        return len(self._free) + len(self._cached)

    def available_after_sharing(self, pages: Sequence[int]) -> int:
        """What `available` would be after `share(pages)` (cached pages it takes stop being available)."""
        return self.available() - sum(1 for page in pages if self._refs[page] == 0)

    def take(self, n: int) -> list[int]:
        """n pages for a sequence (reference count 1), evicting cached prefixes as needed; ValueError if too few."""
        if n > self.available():
            raise ValueError(f"{n} pages requested, {self.available()} available")
        while len(self._free) < n:
            self._evict(next(iter(self._cached)))
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refs[page] = 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """One more reader of each of `pages` (registered pages found by `lookup`)."""
        for page in pages:
            if self._refs[page] == 0:
                self._cached.pop(page)
            self._refs[page] += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    def release(self, pages: Sequence[int]) -> None:
        """One reader fewer of each of a sequence's pages (in its order; released last first, so a page is
        unregistered before the page it was registered below): unread pages are freed, or kept cached if they
        hold a ready prefix."""
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] > 0:
                continue
            node = self._nodes.get(page)
            if node is not None and node.ready:
                self._cached[page] = None
            elif node is not None:  # its writer left before writing it: nobody may find it
                self._evict(page)
            else:
                self._free.append(page)

    def lookup(self, tokens: Sequence[int], limit: int) -> list[PrefixNode]:
        """The registered pages (ready or not) holding tokens[:n] for the largest whole-page n <= limit."""
        nodes, node = [], self._root
        for start in range(0, limit - limit % self.page_size, self.page_size):
            node = node.children.get(tuple(tokens[start:start + self.page_size]))
            if node is None:
                break
            nodes.append(node)
        return nodes

    def register(self, tokens: Sequence[int], pages: Sequence[int], first: int, after: PrefixNode | None) -> list:
        """Registers pages[i] as holding page `first + i` of tokens (whole pages only), below `after` (the last
        page `lookup` found, None for the root); returns the new nodes, ready once `mark_ready`."""
        parent, nodes = after or self._root, []
        for i, page in enumerate(pages):
            start = (first + i) * self.page_size
            key = tuple(tokens[start:start + self.page_size])
            if len(key) < self.page_size or key in parent.children:
                break  # a partial page, or one registered already (a prompt's last token is always recomputed)
            parent.children[key] = parent = self._nodes[page] = PrefixNode(page, key, parent)
            nodes.append(parent)
        return nodes

    def forget_prefixes(self) -> None:
        """Unregisters every page (new weights make their keys and values stale): cached ones are freed, ones in
        use stay with their readers until released."""
        for page in list(self._nodes):
            node = self._nodes.pop(page)
            node.children.clear()
            if page in self._cached:
                del self._cached[page]
                self._free.append(page)
        self._root.children.clear()

    @staticmethod
    def mark_ready(nodes: Sequence[PrefixNode]) -> None:
        for node in nodes:
            node.ready = True

    def _evict(self, page: int) -> None:
        """Unregisters and frees `page`; pages below it went first (every reader releases them before it)."""
        node = self._nodes.pop(page)
        assert not node.children, f"page {page} evicted before the pages registered below it"
        del node.parent.children[node.tokens]
        self._cached.pop(page, None)
        self._free.append(page)
