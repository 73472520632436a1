"""One caching pass shared by the processes of a run (accelerate / torchrun), for the caches every process needs
whole (batches are drawn across the whole dataset, so every process needs every example's latents).

The pass goes in three steps, each process running the same code:
1. every process reads the cache files and finds what is missing; the processes agree on the union of it
   (`ProcessShare.agree`, a collective: no process goes on to write before every process has finished reading);
2. item k of that agreed list is encoded by process k % N (`ProcessShare.mine`), which alone writes its file (a
   text-encoder file holds several captions: missing file k is written by process k % N once the captions are
   exchanged);
3. the encoded items travel to every process through the collective (`ProcessShare.exchange`), in rounds of
   bounded size; no process reads a file another wrote in this pass, so none reads a file half-written, and a
   cache folder that is not shared between machines still gives every process every item (each machine's copy
   of the folder then holds only the files its own processes wrote: share the folder to keep a whole disk cache).

No collective is held across the long part: the processes meet before encoding and after it, and a share
differs from another by at most one item, so each wait lasts about one item's encoding, well inside the
process group's timeout (torch's default: 30 minutes for gloo, 10 for NCCL). With one process nothing is
exchanged and the pass is exactly the single-process one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

Gather = Callable[[list], list]
"""A collective: this process's list in, every process's lists out, concatenated in process order."""

EXCHANGE_ROUND_BYTES = 128 * 2**20
"""At most this many bytes of encoded items (all processes together) travel in one round of `exchange`: every
process holds a round's items twice for a moment (pickled and unpickled), whatever the dataset's size."""


@dataclass(frozen=True)
class CachePass:
    """What one caching pass did, for the line the trainer prints."""

    images: int
    """Images the pass covered."""
    from_files: int
    """Of them, those whose cache file fitted and was read."""
    encoded: int
    """Items encoded by all processes together: images for the VAE, distinct captions for the text encoders."""
    encoded_here: int
    """Of them, those this process encoded."""
    written_here: int
    """Cache files this process wrote."""


def _alone(items: list) -> list:
    return list(items)


@dataclass(frozen=True)
class ProcessShare:
    """This process's place in the run (`rank` of `count`) and the collective that joins them; the default is a
    run of one process, where nothing is exchanged."""

    rank: int = 0
    count: int = 1
    gather: Gather = field(default=_alone, repr=False)
    """Every process must call it the same number of times, in the same order (it is a collective)."""

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.rank < self.count:
            raise ValueError(f"process {self.rank} of {self.count} does not exist")

    def agree(self, items: Iterable[K]) -> list[K]:
        """The sorted union of every process's `items` (what any process found missing). A collective, so every
        process has also finished what it did before calling it."""
        mine = sorted(set(items))
        if self.count == 1:
            return mine
        return sorted(set(self.gather(mine)))

    def mine(self, work: Sequence[T]) -> list[T]:
        """This process's share of the agreed `work`: items rank, rank + count, ... (shares differ by at most one)."""
        return list(work[self.rank :: self.count])

    def exchange(
        self,
        work: Sequence[K],
        done: Mapping[K, Any],
        nbytes: Callable[[K], int],
        round_bytes: int = EXCHANGE_ROUND_BYTES,
    ) -> dict[K, Any]:
        """Every item of the agreed `work`, given `done`, this process's share of it (`mine(work)`) encoded.

        The work is cut into rounds of at most `round_bytes` (`nbytes(item)` each; the cut depends on `work` only,
        so every process takes part in the same rounds) and each round is one collective."""
        result = dict(done)
        if self.count == 1:
            return result
        for round_items in _rounds(work, nbytes, round_bytes):
            for key, value in self.gather([(key, done[key]) for key in round_items if key in done]):
                result[key] = value
        missing = [key for key in work if key not in result]
        if missing:
            raise RuntimeError(f"{len(missing)} items were encoded by no process (first: {missing[0]!r})")
        return result


ONE_PROCESS = ProcessShare()
"""A run of one process: every item is this process's, nothing is exchanged."""


def _rounds(work: Sequence[K], nbytes: Callable[[K], int], round_bytes: int) -> list[list[K]]:
    """`work` cut in order into runs of at most `round_bytes` (an item larger than that makes a round alone)."""
    rounds: list[list[K]] = []
    current: list[K] = []
    size = 0
    for key in work:
        item = nbytes(key)
        if current and size + item > round_bytes:
            rounds.append(current)
            current, size = [], 0
        current.append(key)
        size += item
    if current:
        rounds.append(current)
    return rounds
