"""How much memory distinct heavy regex selectors leave behind in the worker's selector
caches (issue 15: 300 ~40-byte heavy regexes grew a worker by 1 GB).

Resolves N distinct regexes, each near the compile caps (``(?:a{100}){100}`` expands to
~10,000 elements), against a model of 2,000 names, as a Set does (NameIndex.match), and
reports the traced Python heap (tracemalloc) and resident memory growth, and the caches'
own byte accounting when they have one.

    python bench/bench_selector_cache.py [N]      # default 300
    python bench/bench_selector_cache.py --quick  # a smoke run (CI): 10 regexes
"""

from __future__ import annotations

import argparse
import gc
import resource
import tracemalloc


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(n: int = 300) -> None:
    from lrctl.server import selectors

    names = [f"encoder.layers.{i}.weight" for i in range(2000)]
    index = selectors.NameIndex(names)
    index.match("re:layers")  # warm up imports and the index
    gc.collect()
    tracemalloc.start()
    rss0, heap0 = rss_mb(), tracemalloc.get_traced_memory()[0]
    for k in range(n):
        # ~40 characters, distinct, heavy to compile, matching every name (cached arrays too).
        index.match(f"re:(?:x{{100}}){{100}}|r|{k:06d}|s")
    gc.collect()
    heap = (tracemalloc.get_traced_memory()[0] - heap0) / 2**20
    print(f"{n} distinct heavy regexes: traced heap +{heap:.0f} MiB, RSS +{rss_mb() - rss0:.0f} MiB")
    for what in ("SELECTOR_CACHE",):
        cache = getattr(selectors, what, None)
        if cache is not None:
            print(f"  {what}: {len(cache)} entries, {cache.bytes / 2**20:.1f} MiB accounted "
                  f"(bound {cache.max_bytes / 2**20:.0f} MiB)")
    matches = getattr(index, "_matches", None)
    if matches is not None and hasattr(matches, "bytes"):
        print(f"  match cache: {len(matches)} entries, {matches.bytes / 2**20:.1f} MiB accounted "
              f"(bound {matches.max_bytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=300, help="distinct regexes (default 300)")
    parser.add_argument("--quick", action="store_true", help="smoke run (CI): 10 regexes")
    args = parser.parse_args()
    main(10 if args.quick else args.n)
