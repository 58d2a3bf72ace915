"""The synthetic-weight rule reproduces the checksums the reference recorded."""
import pytest
import torch

from helpers import checksums, entries, synth


@pytest.mark.parametrize("which", ["muq", "mucodec", "audioldm_48k"])
def test_rule_matches_reference_checksums(which):
    sums = checksums()[f"{which}.json"]
    small = [(n, s, d) for n, s, d in entries(which) if torch.Size(s).numel() <= 4_000_000]
    checked = 0
    for name, shape, dtype in small:
        if name not in sums:
            continue
        seed_name = name
        ref = sums[name]
        t = synth(seed_name, shape, dtype)
        if t is None:
            continue
        t = t.double()
        assert t.sum().item() == pytest.approx(ref["sum"], rel=1e-6, abs=1e-6), name
        assert (t * t).sum().item() == pytest.approx(ref["sumsq"], rel=1e-6, abs=1e-6), name
        assert t.flatten()[:3].tolist() == pytest.approx(ref["first"], rel=1e-6, abs=1e-9), name
        checked += 1
    assert checked > 50
