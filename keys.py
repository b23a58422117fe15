"""The names of a study's stages and the seeds they draw from: one owner for both, so that a stage's checkpoint
name and its randomness cannot drift apart. A seed is a CRC-32 of the parts of its name, so each stage is
reproducible on its own (a resume needs no saved random streams), whatever rank or tool runs it.
"""
import zlib


def stage_seed(*parts) -> int:
    """The seed of a stage named by `parts` (joined with "/"): the same parts always give the same seed."""
    return zlib.crc32("/".join(map(str, parts)).encode())
