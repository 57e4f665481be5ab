"""The paged KV pool's bookkeeping: which blocks are free, and each request's block table.

The tensors themselves live in the model runner (the only code that touches the device);
this file deals only in integers, so every test of it runs without a model.
"""
from __future__ import annotations

from collections import deque

from engine.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_hold(self, request: Request, num_tokens: int) -> bool:
        """Whether the request's KV can grow to num_tokens with the blocks free now."""
        need = blocks_for(num_tokens, self.block_size) - len(request.block_table)
        return need <= len(self._free)

    def grow(self, request: Request, num_tokens: int) -> bool:
        """Give the request enough blocks for num_tokens positions; False (nothing taken) if
        the pool is short."""
        need = blocks_for(num_tokens, self.block_size) - len(request.block_table)
        if need > len(self._free):
            return False
        for _ in range(max(0, need)):
            request.block_table.append(self._free.popleft())
        return True

    def rollback(self, request: Request, num_tokens: int) -> None:
        """Forget the K/V of every position >= num_tokens (rejected drafts) and return the
        blocks that no longer hold any kept position."""
        assert 0 <= num_tokens <= request.num_computed_tokens
        request.num_computed_tokens = num_tokens
        keep = blocks_for(num_tokens, self.block_size)
        self._free.extend(request.block_table[keep:])
        del request.block_table[keep:]

    def release(self, request: Request) -> None:
        """Return all of a request's blocks (finished, aborted or preempted)."""
        self._free.extend(request.block_table)
        request.block_table.clear()
        request.num_computed_tokens = 0
