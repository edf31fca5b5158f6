"""The host side of the paged cache: reference counts, the prefix trie, cached pages and their eviction."""
import pytest

from alignment.generation.pages import PagePool


def test_pages_are_taken_shared_and_freed():
    pool = PagePool(6, 4)  # pages 1-5; page 0 is scratch
    a = pool.take(3)
    assert a == [1, 2, 3] and pool.in_use == 3 and pool.available() == 2
    pool.share(a[:2])  # a second reader of the first two
    pool.release(a)
    assert pool.in_use == 2 and pool.available() == 3  # page 3 free again, 1 and 2 still read
    pool.release(a[:2])
    assert pool.in_use == 0 and pool.available() == 5 and pool.peak_in_use == 3
    with pytest.raises(ValueError, match="6 pages requested, 5 available"):
        pool.take(6)


def test_registered_prefixes_are_found_only_under_the_same_tokens():
    pool = PagePool(8, 4)
    tokens = list(range(10, 21))  # 11 tokens: two whole pages and a partial one
    pages = pool.take(3)
    nodes = pool.register(tokens, pages, 0, None)
    assert [n.page for n in nodes] == pages[:2]  # the partial page is never registered
    assert [n.page for n in pool.lookup(tokens, 10)] == pages[:2]
    assert [n.page for n in pool.lookup(tokens, 7)] == pages[:1]  # whole pages below the limit only
    assert pool.lookup([99] + tokens[1:], 10) == []  # a different first page hides everything after it
    assert not any(n.ready for n in nodes)
    pool.mark_ready(nodes[:1])
    pool.release(pages)
    # The ready page stays cached for later readers; the unwritten one was unregistered and freed.
    assert pool.in_use == 0 and [n.page for n in pool.lookup(tokens, 10)] == pages[:1]
    assert pool.available_after_sharing(pages[:1]) == pool.available() - 1


def test_cached_pages_are_evicted_least_recently_released_first_deepest_first():
    pool = PagePool(5, 2)  # pages 1-4
    first, second = [1, 2, 3, 4], [5, 6, 7, 8]
    a = pool.take(2)
    pool.mark_ready(pool.register(first, a, 0, None))
    b = pool.take(2)
    pool.mark_ready(pool.register(second, b, 0, None))
    pool.release(a)
    pool.release(b)  # both prefixes cached; `first` released earlier, each one's second page before its first
    assert pool.available() == 4 and pool.in_use == 0
    assert pool.take(1) == [a[1]]  # no free page: `first`'s second page goes, its first page stays findable
    assert [n.page for n in pool.lookup(first, 4)] == a[:1] and len(pool.lookup(second, 4)) == 2
    assert sorted(pool.take(2)) == sorted([a[0], b[1]]) and pool.lookup(first, 4) == [] and len(pool.lookup(second, 4)) == 1


def test_new_weights_forget_every_prefix():
    pool = PagePool(6, 2)
    pages = pool.take(2)
    pool.mark_ready(pool.register([1, 2, 3, 4], pages, 0, None))
    reader = pool.take(1)
    pool.release(pages[:1] + reader)  # page 1 cached; page 2 still read
    pool.forget_prefixes()
    assert pool.lookup([1, 2, 3, 4], 4) == [] and pool.in_use == 1
    pool.release(pages[1:])
    assert pool.in_use == 0 and pool.available() == 5
