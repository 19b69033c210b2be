"""Host copies into chunk-pinned staging memory are cut at the registrations' boundaries (CPU check of the cut;
tests/test_cuda.py checks the copies on a GPU)."""
from __future__ import annotations

import pytest
import torch

from asyncckpt.staging import registered_pieces

CHUNK = 4096


@pytest.mark.parametrize("offset,nbytes", [(0, 100), (0, CHUNK), (64, CHUNK), (CHUNK - 64, 128), (128, 5 * CHUNK + 8),
                                           (CHUNK, 3 * CHUNK), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.bfloat16, torch.bool])
def test_pieces_cover_the_copy_and_never_cross_a_boundary(offset, nbytes, dtype):
    buf = torch.zeros(8 * CHUNK, dtype=torch.uint8)
    size = torch.empty(0, dtype=dtype).element_size()
    n = nbytes // size
    dst = buf[offset: offset + n * size].view(dtype)
    src = torch.randint(0, 2, (n,)).to(dtype) if dtype == torch.bool else torch.randn(n).to(dtype) \
        if dtype.is_floating_point else torch.randint(0, 255, (n,), dtype=dtype)
    pieces = registered_pieces(dst, src, CHUNK)
    for d, s in pieces:
        start = d.storage_offset() * d.element_size()
        end = start + d.numel() * d.element_size()
        assert end == start or start // CHUNK == (end - 1) // CHUNK
        d.copy_(s)
    assert sum(d.numel() * d.element_size() for d, _ in pieces) == n * size
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))


def test_a_non_contiguous_source_is_cut_in_its_logical_order():
    buf = torch.zeros(4 * CHUNK, dtype=torch.uint8)
    src = torch.arange(32 * 40, dtype=torch.float32).view(32, 40).t()  # 5,120 bytes, not contiguous
    dst = buf[CHUNK - 256: CHUNK - 256 + src.numel() * 4].view(torch.float32).view(src.shape)
    pieces = registered_pieces(dst, src, CHUNK)
    assert [d.numel() for d, _ in pieces] == [256, CHUNK, 5120 - 256 - CHUNK]
    for d, s in pieces:
        d.copy_(s)
    assert torch.equal(dst, src)
