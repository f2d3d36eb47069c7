"""The paged latent cache: MLA's cache (latent c + rope key k^R per token per layer) in fixed-size blocks
from one pool, with content-addressed prefix reuse.

- `PagedLatentCache` holds the tensors: per layer a pool [n_blocks, block_size, C] (and [.., R]). A step
  addresses it through block tables [B, K]: token position p of row b lives in block table[b, p // bs],
  offset p % bs. Block 0 is the null block: never handed out, it takes the writes of right-padding and
  is what a table's unused columns point at (read, then masked as future positions).
- `BlockPool` does the bookkeeping (no tensors): a free list, a reference count per block, and the prefix
  cache. A block whose every token is computed gets the hash of the token ids up to and including it,
  chained block to block (so equal hashes mean equal prefixes, not just equal blocks); a new request
  reuses the longest run of cached blocks of its tokens. A freed block keeps its hash and contents and
  joins an LRU list: reusable until its slot is needed for something else (then it is evicted).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from ..model import CacheStep

NULL_BLOCK = 0


def block_hashes(tokens: list[int], block_size: int, parent: bytes = b"", start: int = 0) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens` from block `start` on (`parent`: block start-1's hash)."""
    out = []
    for i in range(start, len(tokens) // block_size):
        parent = hashlib.blake2b(parent + array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


class BlockPool:
    """Block ids 1..n_blocks-1, reference-counted; full computed blocks findable by their chained hash."""

    def __init__(self, n_blocks: int, prefix_caching: bool = True):
        self.n_blocks, self.prefix_caching = n_blocks, prefix_caching
        self.free: list[int] = list(range(n_blocks - 1, NULL_BLOCK, -1))  # never cached (or evicted)
        self.refs = [0] * n_blocks
        self.hash_of: dict[int, bytes] = {}             # block -> its hash (cached blocks only)
        self.by_hash: dict[bytes, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks no request holds, oldest first
        self.queries = self.hits = 0                     # prefix-cache tokens asked for / found

    @property
    def n_usable(self) -> int:
        return self.n_blocks - 1

    @property
    def n_available(self) -> int:
        """Blocks a request could take now: free ones and cached ones nobody holds (evictable)."""
        return len(self.free) + len(self.lru)

    @property
    def n_used(self) -> int:
        return self.n_usable - self.n_available

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (evicting the least recently used cached ones if need be), or None if too few."""
        if n > self.n_available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:
                b, _ = self.lru.popitem(last=False)
                del self.by_hash[self.hash_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]):
        """Drop one reference to each block; the last one frees it: to the LRU list if it is cached
        (tail blocks first, so a prefix's tail is evicted before its head), else to the free list."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each now held once more by the caller."""
        out = []
        if not self.prefix_caching:
            return out
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            if self.refs[b] == 0:
                del self.lru[b]
            self.refs[b] += 1
            out.append(b)
        return out

    def cached(self, h: bytes) -> bool:
        return h in self.by_hash

    def register(self, block: int, h: bytes):
        """`block` is full and computed: make it findable (unless an equal block already is)."""
        if self.prefix_caching and h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h], self.hash_of[block] = block, h

    def reset(self):
        """Forget every cached prefix (the weights changed): held blocks stay, their contents unshared."""
        for b in self.lru:
            self.free.append(b)
        self.lru.clear()
        self.by_hash.clear()
        self.hash_of.clear()


class PagedLatentCache:
    """The pool's tensors: per layer latent [n_blocks, block_size, C] and rope keys [n_blocks, block_size, R]."""

    def __init__(self, cfg, n_blocks: int, block_size: int, n_layers: int, dtype=torch.float32, device="cpu"):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.latent = [torch.zeros(n_blocks, block_size, cfg.kv_lora_rank, dtype=dtype, device=device)
                       for _ in range(n_layers)]
        self.k_rope = [torch.zeros(n_blocks, block_size, cfg.qk_rope_head_dim, dtype=dtype, device=device)
                       for _ in range(n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.latent + self.k_rope)

    def layer(self, i: int):
        return self.latent[i], self.k_rope[i]

    def address(self, positions_BT, tables_BK, attend_len: int | None = None) -> CacheStep:
        """Tokens at `positions_BT` of the rows whose block tables are `tables_BK` (padded with the null
        block; K * block_size must cover every position and attend_len) attend over [0, attend_len)."""
        bs = self.block_size
        if attend_len is None:
            attend_len = int(positions_BT.max()) + 1
        write_BT = tables_BK.gather(1, positions_BT // bs) * bs + positions_BT % bs
        s_S = torch.arange(attend_len, device=positions_BT.device)
        read_BS = tables_BK[:, s_S // bs] * bs + s_S % bs
        return CacheStep(positions_BT, attend_len, write_BT.reshape(-1), read_BS=read_BS)
