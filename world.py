"""A study on many processes: torchrun's group as a work queue (PyTorch's own distributed engine, no other).

    python al_loop.py ...                                   # a world of one: no process group, no store
    torchrun --nproc-per-node 8 al_loop.py ...              # 8 workers on one node
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 al_loop.py ...

The workers share --out on a shared file system and coordinate only through the group's key-value store:
an atomic counter hands out the units of work in a fixed order, and a "failed" key stops everyone when a
worker fails. Which worker runs a unit never changes its result (every unit seeds its own randomness).
"""
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


class World:
    """This process's place in the group: rank, size, device index, and the shared queue."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.counters = {}                   # a world of one counts here
        self.store = None
        if self.size > 1:
            # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); without torchrun, rank 0 does.
            # Keys carry the restart count: a restarted group starts a fresh queue (finished units are on disk).
            host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and self.rank == 0
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.size, host,
                                  timeout=timedelta(hours=2))
            self.store = dist.PrefixStore(f"proxy-al/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                    store=dist.PrefixStore("group", self.store), rank=self.rank, world_size=self.size)

    def device(self, name):
        """--device for this rank: rank r takes cuda:(LOCAL_RANK % device count); several ranks may share one."""
        if self.size > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return name

    def add(self, key, amount=1):
        """Atomically add to a counter shared by the group; returns the new value."""
        if self.store is None:
            self.counters[key] = self.counters.get(key, 0) + amount
            return self.counters[key]
        return self.store.add(key, amount)

    def claim(self):
        """The index of the next unit of work: each index goes to exactly one rank."""
        return self.add("next") - 1

    def set(self, key, value):
        if self.store is not None:
            self.store.set(key, value)

    def get(self, key):
        """The value another rank set (waits for it)."""
        return self.store.get(key).decode()

    def fail(self, message):
        """Tell every rank to stop (the first failure wins)."""
        if self.store is not None:
            self.store.compare_set("failed", "", message)

    def check(self):
        """Stop this rank if another one failed."""
        if self.store is not None and self.store.check(["failed"]):
            raise SystemExit(f"rank {self.rank} stops: {self.get('failed')}")

    def wait(self, ready, what, log, every_s=60.0):
        """Poll ready() until it holds; stop within a second of another rank's failure."""
        t0 = last = time.time()
        while not ready():
            self.check()
            if time.time() - last > every_s:
                log(f"waiting {time.time() - t0:.0f} s for {what}")
                last = time.time()
            time.sleep(0.2)

    def work(self, units, run_unit):
        """Take units (kind, seed, what) from the shared queue until it is empty, run_unit(*unit) for each this
        rank gets. A unit that fails stops every rank within a second, with a message naming rank and unit."""
        while (i := self.claim()) < len(units):
            self.check()
            kind, seed, what = units[i]
            try:
                run_unit(kind, seed, what)
            except BaseException as err:
                message = f"rank {self.rank} failed in unit {kind} seed {seed} {what or ''}: {err!r}"[:2000]
                if self.size > 1:
                    print(message, file=sys.stderr, flush=True)
                self.fail(message)
                raise

    def close(self):
        if self.store is not None and dist.is_initialized():
            dist.destroy_process_group()
