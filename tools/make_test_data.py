"""Rebuild ``tests/data`` (the golden data of the test suite) from the MuCodec reference data folder.

Usage::

    python3 tools/make_test_data.py PATH/TO/reference [--out tests/data]

``PATH/TO/reference`` is the reference data folder produced by running the official MuCodec code with the
deterministic synthetic weights (its README documents every array). The tests read only what this
script writes, so a checkout runs its tests with nothing beside it.

What is kept, per golden ``.npz`` file (see ``SPEC``; everything not named there is copied unchanged):

* Inputs fed to the models (signals, noise, codes, latents, ``x``, ``timestep`` ...) and every small
  array are copied complete and bit-exact (float32 / int64, ``np.savez_compressed``, no pickles).
* ``drop``: arrays no test reads (e.g. ``pipeline_small/noise_0``, the fully masked first latent that
  cannot change the result), ``head``: only the leading rows the tests read (MuQ hidden states 0-6).
* ``subset``: large expected outputs keep a fixed subset of at least 100 000 elements plus float64
  statistics of the whole original array (mean, std, min, max, mean |x|). The subset positions are not
  stored: ``tests/helpers.py:subset_indices`` derives them from the file and array names with integer
  hashing (splitmix64 ranks; independent of numpy's random generators). A list of counts draws one subset
  per index of axis 0 (with statistics per row too), for arrays whose tests also compare single rows.
  ``tests/helpers.py:Sampled`` explains why the tests' tolerances apply unchanged.

Manifests (``muq``, ``mucodec``, ``audioldm_48k``) keep only ``name``, ``shape`` and ``dtype`` of each
entry; ``synthetic_checksums`` is kept whole; both gzip-compressed JSON. ``README.md`` in the output
lists how each array was stored.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import SUBSET_FIELDS, subset_indices, summary_stats  # noqa: E402

N = 100_000  # subset size of a large expected output

SPEC = {
    "computed_buffers": {},
    "rvq_cond": {},
    "muq_layer": {
        "last_hidden_state": "drop",  # = hidden_states[12], not read
        "hidden_states": ("head", 7),  # MuCodec uses layers up to hidden_states[6]
    },
    "cfm_solve": {
        # the tests compare all three steps (1e-3) and step 0 alone (1e-5): 100 000 of step 0's elements
        # and 168 000 of the whole array
        "step_inputs_noprefix": ("subset", [N, 34_000, 34_000]),
        "step_inputs_prefix": ("subset", [N, 34_000, 34_000]),
        "step_outputs_noprefix": ("subset", N),
        "step_outputs_prefix": ("subset", N),
    },
    "dit_forward": {
        "pos_embed_32x16": ("subset", N),
        "patch_embed_out": ("subset", N),
        "block0_out": ("subset", N),
        "block_last_out": ("subset", N),
    },
    "pipeline_small": {
        "noise_0": "drop",
        "window0_latents": ("subset", N),
        "window0_mel": ("subset", N),
        "wav": ("subset", N),
    },
    "vae_vocoder": {
        "wav_long": ("subset", N),
    },
}
MANIFESTS = ("muq", "mucodec", "audioldm_48k")
MANIFEST_FIELDS = ("name", "shape", "dtype")


def subsample(file: str, key: str, a: np.ndarray, counts) -> tuple[dict, str]:
    """The stored fields of a sampled array, and a description for the README."""
    label = f"{file}/{key}"
    if a.dtype != np.float32:
        raise ValueError(f"{label}: only float32 outputs are subsampled")
    if isinstance(counts, int):
        counts, rows, labels = [counts], [a], [label]
        stats = summary_stats(a)[None]
    else:
        if len(counts) != a.shape[0]:
            raise ValueError(f"{label}: {len(counts)} counts for {a.shape[0]} rows")
        rows, labels = list(a), [f"{label}/{g}" for g in range(a.shape[0])]
        stats = np.stack([summary_stats(a)] + [summary_stats(r) for r in rows])
    values = np.concatenate([r.reshape(-1)[subset_indices(r.size, c, lab)] for r, c, lab in zip(rows, counts, labels)])
    fields = {"subset": values.astype(np.float32), "shape": np.array(a.shape, np.int64),
              "counts": np.array(counts, np.int64), "stats": stats}
    assert set(fields) == set(SUBSET_FIELDS)
    per_row = "" if len(counts) == 1 else f" ({' + '.join(map(str, counts))} per row of axis 0)"
    return {f"{key}.{f}": v for f, v in fields.items()}, f"subset of {values.size} of {a.size}{per_row} + statistics"


def convert_npz(src: Path, dst: Path, file: str, rules: dict) -> list[tuple[str, str, str]]:
    with np.load(src / f"{file}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    unknown = set(rules) - set(arrays)
    if unknown:
        raise KeyError(f"{file}.npz has no {sorted(unknown)}")
    out, notes = {}, []
    for key, a in arrays.items():
        rule = rules.get(key, "keep")
        shape = "x".join(map(str, a.shape)) or "scalar"
        if rule == "keep":
            out[key] = a
            notes.append((key, shape, "complete"))
        elif rule == "drop":
            notes.append((key, shape, "dropped (no test reads it)"))
        elif rule[0] == "head":
            out[key] = a[: rule[1]]
            notes.append((key, shape, f"rows 0..{rule[1] - 1} of axis 0, complete"))
        elif rule[0] == "subset":
            fields, note = subsample(file, key, a, rule[1])
            out.update(fields)
            notes.append((key, shape, note))
        else:
            raise ValueError(f"{file}/{key}: unknown rule {rule!r}")
    np.savez_compressed(dst / f"{file}.npz", **out)
    return notes


def write_json_gz(obj, path: Path):
    # mtime=0 keeps the bytes independent of when the script ran
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps(obj, separators=(",", ":")).encode())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", type=Path, help="the reference data folder")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data", help="default: tests/data of this checkout")
    args = ap.parse_args(argv)
    src, dst = args.reference, args.out
    dst.mkdir(parents=True, exist_ok=True)

    readme = ["# Test data", "",
              "Written by `tools/make_test_data.py` from the reference data folder (official MuCodec code run with",
              "deterministic synthetic weights); that script's docstring explains the rules. Do not edit by hand.", "",
              "| file | array | original shape | stored |", "| --- | --- | --- | --- |"]
    for file, rules in SPEC.items():
        for key, shape, note in convert_npz(src, dst, file, rules):
            readme.append(f"| `{file}.npz` | `{key}` | {shape} | {note} |")

    for which in MANIFESTS:
        with open(src / f"{which}.json") as f:
            entries = json.load(f)["entries"]
        write_json_gz({"entries": [{k: e[k] for k in MANIFEST_FIELDS} for e in entries]}, dst / f"{which}.json.gz")
    with open(src / "synthetic_checksums.json") as f:
        write_json_gz(json.load(f), dst / "synthetic_checksums.json.gz")
    readme += ["", "Manifests `muq`, `mucodec`, `audioldm_48k`: name, shape and dtype of every entry (gzip JSON).",
               "`synthetic_checksums.json.gz`: the reference's checksums of the synthetic weights, complete.", ""]
    (dst / "README.md").write_text("\n".join(readme))

    total = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
    print(f"wrote {dst} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
