"""Selection kernels checked against pandas on a TreeOfLife-like catalog."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from stages.kernels.hashing import seeded_rank
from stages.kernels.select import cap_per_group, check_predicates, predicate_mask


def tol_catalog(n=3000, seed=0) -> pa.Table:
    """A TreeOfLife-like catalog: taxonomy ranks, source, basisOfRecord, licence, year, nulls."""
    rng = np.random.default_rng(seed)
    classes = np.array(["Aves", "Mammalia", "Insecta", "Magnoliopsida", "Actinopterygii"])
    cls = classes[rng.integers(0, 5, n)]
    species = np.array([f"{c[:3]}_sp{int(k)}" for c, k in zip(cls, rng.zipf(1.6, n) % 40)])
    kingdom = np.where(cls == "Magnoliopsida", "Plantae", "Animalia")
    basis = np.array(["HumanObservation", "PreservedSpecimen", "MachineObservation"])[rng.integers(0, 3, n)]
    lic = np.array(["cc0", "cc-by", "cc-by-nc", "cc-by-sa", "all-rights-reserved"])[rng.integers(0, 5, n)]
    year = rng.integers(1850, 2025, n).astype(float)
    year[rng.random(n) < 0.1] = np.nan
    family = [None if rng.random() < 0.15 else f"fam{int(k)}" for k in rng.integers(0, 12, n)]
    return pa.table({
        "uuid": [f"u{i:06d}" for i in range(n)], "kingdom": kingdom, "class": cls, "family": family,
        "species": species, "source": np.array(["eol", "gbif", "bioscan", "fathomnet"])[rng.integers(0, 4, n)],
        "basisOfRecord": basis, "license": lic, "year": pa.array(year, from_pandas=True),
    })


CASES = [
    ([{"column": "class", "eq": "Aves"}], lambda d: d["class"] == "Aves"),
    ([{"column": "kingdom", "ne": "Plantae"}], lambda d: d["kingdom"] != "Plantae"),
    ([{"column": "license", "in": ["cc0", "cc-by"]}], lambda d: d["license"].isin(["cc0", "cc-by"])),
    ([{"column": "basisOfRecord", "not_in": ["PreservedSpecimen"]}],
     lambda d: ~d["basisOfRecord"].isin(["PreservedSpecimen"])),
    ([{"column": "family", "not_in": ["fam1", "fam2"]}],
     lambda d: d["family"].notna() & ~d["family"].isin(["fam1", "fam2"])),
    ([{"column": "family", "in": ["fam3"]}], lambda d: d["family"].isin(["fam3"])),
    ([{"column": "year", "between": [1990, 2010]}], lambda d: d["year"].between(1990, 2010)),
    ([{"column": "year", "gt": 2000}], lambda d: d["year"] > 2000),
    ([{"column": "year", "le": 1900}], lambda d: d["year"] <= 1900),
    ([{"column": "family", "is_null": True}], lambda d: d["family"].isna()),
    ([{"column": "year", "is_null": False}], lambda d: d["year"].notna()),
    ([{"column": "class", "in": ["Aves", "Mammalia"]}, {"column": "basisOfRecord", "ne": "PreservedSpecimen"},
      {"column": "license", "in": ["cc0", "cc-by"]}, {"column": "year", "ge": 1950}],
     lambda d: d["class"].isin(["Aves", "Mammalia"]) & (d["basisOfRecord"] != "PreservedSpecimen")
     & d["license"].isin(["cc0", "cc-by"]) & (d["year"] >= 1950)),
]


@pytest.mark.parametrize("preds, expect", CASES)
def test_predicates_match_pandas(preds, expect):
    table = tol_catalog()
    check_predicates(table.schema, preds)
    got = predicate_mask(table, preds)
    want = expect(table.to_pandas()).fillna(False).to_numpy(dtype=bool)
    assert got.sum() > 0 and np.array_equal(got, want)


@pytest.mark.parametrize("pred, msg", [
    ({"column": "genus", "eq": "x"}, "select.where[0].column: 'genus' is not a column"),
    ({"column": "year", "eq": "recent"}, "cannot compare with column 'year'"),
    ({"column": "class", "gt": 3}, "cannot compare with column 'class'"),
    ({"column": "class", "in": "Aves"}, "must be a non-empty list"),
    ({"column": "year", "between": [1]}, "must be [low, high]"),
])
def test_bad_predicates_are_named(pred, msg):
    with pytest.raises(ValueError) as e:
        check_predicates(tol_catalog(50).schema, [pred])
    assert msg in str(e.value)


def test_cap_per_group_keeps_lowest_ranks_and_is_order_free():
    table = tol_catalog()
    ids = np.array(table.column("uuid").to_pylist())
    species = np.array(table.column("species").to_pylist(), dtype=object)
    rank = seeded_rank(5, ids)
    keep = cap_per_group(species, rank, 7)
    df = pd.DataFrame({"species": species, "rank": rank.astype(np.float64), "keep": keep})
    counts = df[df.keep].groupby("species").size()
    sizes = df.groupby("species").size()
    assert (counts == np.minimum(sizes, 7)).all()
    for sp, g in df.groupby("species"):  # the kept ones are the lowest ranks
        assert set(g.nsmallest(7, "rank").index) == set(g[g.keep].index)
    perm = np.random.default_rng(1).permutation(len(ids))
    keep2 = cap_per_group(species[perm], rank[perm], 7)
    assert set(ids[perm][keep2]) == set(ids[keep])


def test_cap_keeps_rows_without_a_taxon():
    keep = cap_per_group(np.array(["a", None, "a", None, "a"], dtype=object),
                         np.array([3, 1, 2, 0, 1], dtype=np.uint64), 1)
    assert keep.tolist() == [False, True, False, True, True]
