"""parallel/shards.py: exact-once assembly by box arithmetic (no per-element counters)."""
import pytest
import torch

from prism_mcore.parallel.shards import Shard, assemble, assemble_pieces, check_cover


def _pieces(full):
    return [((slice(0, 3), slice(0, 4)), full[:3]), ((slice(3, 6), slice(0, 2)), full[3:, :2]),
            ((slice(3, 6), slice(2, 4)), full[3:, 2:])]


def test_assemble_pieces_and_cover_errors():
    full = torch.randn(6, 4)
    pieces = _pieces(full)
    assert torch.equal(assemble_pieces("k", (6, 4), pieces), full)
    out = torch.empty(6, 4)
    assert assemble_pieces("k", (6, 4), pieces[::-1], out=out) is out and torch.equal(out, full)
    with pytest.raises(ValueError, match="cover 18 of 24"):
        check_cover("k", (6, 4), [r for r, _ in pieces[:2]])
    with pytest.raises(ValueError, match="overlap"):
        check_cover("k", (6, 4), [r for r, _ in pieces] + [(slice(2, 3), slice(3, 4))])
    with pytest.raises(ValueError, match="outside"):
        check_cover("k", (6, 4), [(slice(0, 7), slice(0, 4))])
    # Leading size-1 axes of a piece (a layer of a layered tensor) and non-contiguous destinations.
    t = torch.randn(2, 5, 6)
    got = assemble_pieces("l", (2, 5, 6), [((slice(0, 2), slice(0, 5), slice(0, 3)), t[:, :, :3].contiguous()),
                                           ((slice(0, 2), slice(0, 5), slice(3, 6)), t[:, :, 3:].contiguous())])
    assert torch.equal(got, t)


def test_assemble_uses_primary_pieces_only():
    full = torch.randn(6, 4)
    shards = [Shard("a", (2, 6, 4), (1, 0, 0), full, True), Shard("a", (2, 6, 4), (0, 0, 0), 2 * full, True),
              Shard("a", (2, 6, 4), (0, 0, 0), full, False)]  # a replica: ignored
    out = assemble([shards])["a"]
    assert torch.equal(out[0], 2 * full) and torch.equal(out[1], full)
    with pytest.raises(ValueError, match="cover"):
        assemble([shards[:1]])
