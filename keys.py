"""The names of a study's stages and the seeds they draw from, in one place, so that a stage's checkpoint name
and its randomness cannot drift apart. A seed is a CRC-32 of the parts of its name: each stage is reproducible on
its own (a resume needs no saved random streams), whatever rank or tool runs it.

    key = Key(0, "proxyrank_var", 1)     # seed0/proxyrank_var/iter1: iteration 2 of a strategy
    key.checkpoint("sup")                # seed0/proxyrank_var/iter1_sup: its Ms (checkpoints/<name>.pt)
    key.scoring()                        # the name of the MC-dropout scoring under its final model (mc_seed)
    key.paired("sup", *cases)            # shared by every strategy of seed 0: the same cases, the same patches
    Key(0).of_seed("proxy")              # the seed's own draws outside any strategy (the proxy, random orders)
"""
import zlib
from dataclasses import dataclass


def stage_seed(*parts) -> int:
    """The seed of a stage named by `parts` (joined with "/"): the same parts always give the same seed."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def mc_seed(scoring: str, case: str) -> int:
    """The seed of MC-dropout scoring `case` in the scoring named `scoring` (Key.scoring): the case is seeded on
    its own, so its scores do not depend on the cases scored before it, on the rank, or on the tool."""
    return stage_seed(scoring, "mc", case)


def map_seed(folder: str, case: str) -> int:
    """The seed of the uncertainty map of `case` written into maps/<folder> (or to_annotate/ for annotation)."""
    return stage_seed(folder, case, "map")


@dataclass(frozen=True)
class Key:
    """A stage of a study: a seed's proxy (no strategy), or an active iteration (from 0) of a strategy."""
    seed: int | str
    strategy: str = ""
    iteration: int = 0

    def __str__(self) -> str:
        return f"seed{self.seed}/" + (f"{self.strategy}/iter{self.iteration}" if self.strategy else "proxy")

    def checkpoint(self, stage: str = "") -> str:
        """The name of a checkpoint of this stage: its Ms ("sup") or Msemi ("semi"); the proxy has one ("")."""
        return str(self) + (f"_{stage}" if stage else "")

    @property
    def folder(self) -> str:
        """The stage's name as one folder name (maps/<folder>/)."""
        return str(self).replace("/", "_")

    def scoring(self, part: str = "") -> str:
        """The name of an MC-dropout scoring under this stage's model (ranking.mc_pool's `key`): its own (lines
        3, 12, 15), or another one (`part`: line 9's "certain")."""
        return f"{self}/{part}" if part else str(self)

    def model_seed(self, stage: str = "") -> int:
        """The seed a model draws before a checkpoint of this stage replaces its weights (none of it is kept)."""
        return stage_seed(self.checkpoint(stage))

    def paired(self, *parts) -> int:
        """A seed shared by every strategy of this seed: two strategies differ only in what they do differently."""
        return stage_seed(f"seed{self.seed}", *parts)

    def of_seed(self, *parts) -> int:
        """The seed's own draws outside any strategy: the proxy ("proxy"), line 5's random order ("initial"),
        random acquisitions ("random", j)."""
        return stage_seed(self.seed, *parts)
