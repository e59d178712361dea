"""Loaders: a shop's CSV/Parquet files, MovieLens-100K and the synthetic store as Datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from training.data import ADD_TO_CART, DESKTOP, MOBILE, PURCHASE, TABLET, VIEW, Dataset
from training.loaders import LoadError, ShopFiles, SyntheticSource, load_shop
from training.synthetic import StoreConfig

INTERACTIONS = """\
user_id,item_id,timestamp,event_type,device,country,os
u1,sku-1,1767225600,view,mobile,de,ios
u1,sku-2,2026-01-01T00:10:00Z,add_to_cart,Mobile,DE,ios
u2,sku-1,2026-01-01 00:05,purchase,desktop,FR,
u2,sku-3,1767225700000,transaction,tablet,,android
u3,sku-2,2026-01-02,view,,US,
"""
ITEMS = """\
item_id,category,brand,price,currency,countries,in_stock,tags
sku-1,Fashion > Shoes,Acme,50,EUR,DE|FR,true,high_margin|clearance
sku-2,fashion/bags,,20.5,USD,*,no,
sku-3,home,Homey,10,EUR,,,new ; high_margin
sku-4,home/kitchen,Homey,100,EUR,US;DE,1,
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def shop(tmp_path: Path, interactions: str, items: str | None = None, **kw: object) -> ShopFiles:
    inter = write(tmp_path / "interactions.csv", interactions)
    item_path = write(tmp_path / "items.csv", items) if items is not None else None
    return ShopFiles(interactions=inter, items=item_path, **kw)  # type: ignore[arg-type]


def test_reads_a_well_formed_shop(tmp_path: Path) -> None:
    files = shop(tmp_path, INTERACTIONS, ITEMS, currency_rates={"EUR": 1.0, "USD": 1.1})
    loaded = load_shop(files)
    ds = loaded.dataset
    assert ds.name == "interactions"
    assert list(ds.item_ids) == ["sku-1", "sku-2", "sku-3", "sku-4"]
    assert list(ds.user_ids) == ["u1", "u2", "u3"]
    assert ds.n_events == 5
    assert ds.country_codes == ("DE", "FR", "US")
    assert ds.base_currency == "EUR"
    np.testing.assert_allclose(ds.item_price, [50.0, 20.5 / 1.1, 10.0, 100.0])
    assert list(ds.item_in_stock) == [True, False, True, True]
    # Countries: listed ones, or everywhere for "*" and empty.
    np.testing.assert_array_equal(
        ds.item_countries,
        [[True, True, False], [True, True, True], [True, True, True], [True, False, True]],
    )
    names = [ds.category_names[c] for c in ds.item_category]
    assert names == ["Fashion/Shoes", "fashion/bags", "home", "home/kitchen"]
    home = ds.category_names.index("home")
    assert ds.category_parent[ds.category_names.index("home/kitchen")] == home
    assert ds.brand_names[ds.item_brand[1]] == "unknown"
    assert ds.tag_names == ("clearance", "high_margin", "new") and ds.item_tags is not None
    tagged = [{t for j, t in enumerate(ds.tag_names) if int(w) >> j & 1} for w in ds.item_tags]
    assert tagged == [{"high_margin", "clearance"}, set(), {"new", "high_margin"}, set()]
    # Events sorted by time; ms timestamps read as ms; ISO dates as UTC.
    assert np.all(np.diff(ds.ev_ts) >= 0)
    assert list(ds.ev_ts) == [1767225600, 1767225700, 1767225900, 1767226200, 1767312000]
    assert list(ds.ev_type) == [VIEW, PURCHASE, PURCHASE, ADD_TO_CART, VIEW]
    assert list(ds.ev_device) == [MOBILE, TABLET, DESKTOP, MOBILE, 0]
    unknown = len(ds.country_codes)
    assert list(ds.ev_country) == [0, unknown, 1, 0, 2]
    assert list(ds.user_country) == [0, 1, 2]
    assert list(ds.user_device) == [MOBILE, DESKTOP, 0]
    events, items = loaded.reports[1], loaded.reports[0]
    assert (events.rows_read, events.rows_used, events.skipped) == (5, 5, {})
    assert events.notes["country empty: read as unknown"] == 1
    assert items.notes["brand empty: read as unknown"] == 1


def test_parquet_and_csv_give_the_same_dataset(tmp_path: Path) -> None:
    csv_files = shop(tmp_path, INTERACTIONS, ITEMS, currency_rates={"EUR": 1.0, "USD": 1.1})
    table = pa_csv.read_csv(csv_files.interactions)
    pq.write_table(table, tmp_path / "interactions.parquet")
    pq.write_table(pa_csv.read_csv(tmp_path / "items.csv"), tmp_path / "items.parquet")
    from_csv = load_shop(csv_files).dataset
    from_parquet = load_shop(
        ShopFiles(
            interactions=tmp_path / "interactions.parquet",
            items=tmp_path / "items.parquet",
            currency_rates={"EUR": 1.0, "USD": 1.1},
            chunk_rows=2,
        )
    ).dataset
    for name in ("item_ids", "user_ids", "ev_user", "ev_item", "ev_ts", "ev_type", "ev_device"):
        np.testing.assert_array_equal(getattr(from_csv, name), getattr(from_parquet, name), name)
    np.testing.assert_array_equal(from_csv.item_tags, from_parquet.item_tags)
    assert from_csv.tag_names == from_parquet.tag_names


def test_items_without_tags_are_untagged_and_too_many_tags_are_refused(tmp_path: Path) -> None:
    untagged = "\n".join(line.rsplit(",", 1)[0] for line in ITEMS.splitlines()) + "\n"
    files = shop(tmp_path, INTERACTIONS, untagged, currency_rates={"EUR": 1.0, "USD": 1.1})
    ds = load_shop(files).dataset
    assert ds.item_tags is None and ds.tag_names == ()
    many = "|".join(f"t{j}" for j in range(65))
    crowded = ITEMS.replace("high_margin|clearance", many)
    files = shop(tmp_path, INTERACTIONS, crowded, currency_rates={"EUR": 1.0, "USD": 1.1})
    with pytest.raises(
        LoadError, match=r"^items\.csv column tags: at most 64 distinct tags, got 67"
    ):
        load_shop(files)


def test_without_an_items_file_items_come_from_interactions(tmp_path: Path) -> None:
    text = "user_id,item_id,timestamp\nb,x,3\na,y,1\na,x,2\n"
    ds = load_shop(shop(tmp_path, text)).dataset
    assert list(ds.item_ids) == ["x", "y"]
    assert list(ds.user_ids) == ["a", "b"]
    assert list(ds.ev_user) == [0, 0, 1] and list(ds.ev_item) == [1, 0, 0]
    assert ds.country_codes == () and ds.item_countries.shape == (2, 0)
    assert ds.category_names == ("unknown",) and list(ds.item_price) == [1.0, 1.0]


def test_compressed_tab_separated_files(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "events.tsv.gz"
    path.write_bytes(gzip.compress(b"user_id\titem_id\ttimestamp\na\tx\t1\nb\ty\tnope\n"))
    with pytest.raises(LoadError, match=r"events\.tsv\.gz line 3, column timestamp: 'nope'"):
        load_shop(ShopFiles(interactions=path))
    assert load_shop(ShopFiles(interactions=path, on_invalid="skip")).dataset.name == "events"


def test_small_chunks_keep_line_numbers(tmp_path: Path) -> None:
    rows = [f"u{i},i{i},{1767225600 + i}" for i in range(40)]
    rows[30] = "u30,i30,yesterday"
    files = shop(tmp_path, "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n", chunk_rows=1)
    with pytest.raises(LoadError) as err:
        load_shop(files)
    # Header is line 1, so row 30 is line 32.
    assert str(err.value) == (
        "interactions.csv line 32, column timestamp: 'yesterday' is not a unix time or ISO date"
    )


BAD_ROWS = [
    ("u9,,1767225600,view", "line 3, column item_id: is empty", "item_id: empty"),
    (
        "u9,sku-1,abc,view",
        "line 3, column timestamp: 'abc' is not a unix time or ISO date",
        "timestamp: not a unix time or ISO date",
    ),
    (
        "u9,sku-1,2026-02-30,view",
        "line 3, column timestamp: '2026-02-30' is not a unix time or ISO date",
        "timestamp: not a unix time or ISO date",
    ),
    (
        "u9,sku-1,-5,view",
        "line 3, column timestamp: '-5' is not between 1970 and 2100",
        "timestamp: not between 1970 and 2100",
    ),
    (
        "u9,sku-1,1767225600,like",
        "line 3, column event_type: 'like' is not view, add_to_cart or purchase",
        "event_type: not view, add_to_cart or purchase (or an ignored type such as search)",
    ),
    (
        "u9,sku-1,1767225600,view,extra",
        "line 3: has 5 fields, the header has 4",
        "wrong number of fields",
    ),
    ("u9,sku-1", "line 3: has 2 fields, the header has 4", "wrong number of fields"),
]


@pytest.mark.parametrize(("row", "message", "reason"), BAD_ROWS)
def test_a_malformed_row_is_an_error_naming_line_and_column(
    tmp_path: Path, row: str, message: str, reason: str
) -> None:
    text = (
        f"user_id,item_id,timestamp,event_type\nu1,sku-1,1767225600,view\n{row}\nu2,sku-2,1,view\n"
    )
    with pytest.raises(LoadError) as err:
        load_shop(shop(tmp_path, text))
    assert str(err.value).startswith(f"interactions.csv {message}")


@pytest.mark.parametrize(("row", "message", "reason"), BAD_ROWS)
def test_skipping_counts_each_malformed_row_by_reason(
    tmp_path: Path, row: str, message: str, reason: str
) -> None:
    text = f"user_id,item_id,timestamp,event_type\nu1,sku-1,1767225600,view\n{row}\n{row}\nu2,sku-2,1,view\n"
    loaded = load_shop(shop(tmp_path, text, on_invalid="skip"))
    report = loaded.reports[0]
    assert loaded.dataset.n_events == 2
    assert report.rows_used == 2
    assert report.skipped == {reason: 2}
    assert report.examples[reason].startswith(f"interactions.csv {message.split(':')[0]}")


def test_well_formed_rows_left_out_are_counted_even_when_strict(tmp_path: Path) -> None:
    text = (
        "user_id,item_id,timestamp,event_type,rating\n"
        "u1,sku-1,1767225600,view,5\n"
        "\n"
        "u1,sku-2,1767225601,search,\n"
        "u1,sku-9,1767225602,view,4\n"
        "u2,sku-1,1767225603,view,1\n"
        "u2,sku-2,1767225604,impression,3\n"
    )
    items = "item_id\nsku-1\nsku-2\n"
    loaded = load_shop(shop(tmp_path, text, items, min_rating=2.0))
    report = loaded.reports[1]
    assert loaded.dataset.n_events == 1
    assert report.rows_read == 6 and report.rows_used == 1
    assert report.skipped == {
        "empty line": 1,
        "event_type search: not an interest signal": 1,
        "event_type impression: not an interest signal": 1,
        "item_id not in the items file": 1,
        "rating below min_rating 2": 1,
    }
    assert (
        report.examples["item_id not in the items file"]
        == "interactions.csv line 5, column item_id"
    )
    assert report.examples["empty line"] == "interactions.csv line 3"
    assert report.notes == {"rating empty": 1}


def test_missing_required_column_names_the_header(tmp_path: Path) -> None:
    with pytest.raises(
        LoadError,
        match=r"interactions.csv line 1: missing column timestamp \(the header has: user_id, item_id\)",
    ):
        load_shop(shop(tmp_path, "user_id,item_id\nu,i\n"))
    with pytest.raises(LoadError, match="no such file"):
        load_shop(ShopFiles(interactions=tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "sku-2,shoes,Acme,free,EUR,DE,true",
            "line 3, column price: 'free' is not a positive number",
        ),
        ("sku-2,shoes,Acme,-1,EUR,DE,true", "line 3, column price: '-1' is not a positive number"),
        (
            "sku-2,shoes,Acme,10,euro,DE,true",
            "line 3, column currency: 'euro' is not an ISO 4217 code",
        ),
        (
            "sku-2,shoes,Acme,10,EUR,Germany,true",
            "line 3, column countries: 'Germany' is not a list",
        ),
        (
            "sku-2,shoes,Acme,10,EUR,DE,maybe",
            "line 3, column in_stock: 'maybe' is not true or false",
        ),
        (
            "sku-1,shoes,Acme,10,EUR,DE,true",
            "line 3, column item_id: duplicate item_id 'sku-1' (first on line 2)",
        ),
    ],
)
def test_malformed_items_are_errors(tmp_path: Path, row: str, message: str) -> None:
    items = f"item_id,category,brand,price,currency,countries,in_stock\nsku-1,shoes,Acme,10,EUR,DE,true\n{row}\n"
    files = shop(tmp_path, "user_id,item_id,timestamp\nu,sku-1,1\n", items)
    with pytest.raises(LoadError) as err:
        load_shop(files)
    assert str(err.value).startswith(f"items.csv {message}")
    skipped = load_shop(
        shop(tmp_path, "user_id,item_id,timestamp\nu,sku-1,1\n", items, on_invalid="skip")
    )
    assert skipped.reports[0].rows_used == 1
    assert sum(skipped.reports[0].skipped.values()) == 1


def test_prices_in_several_currencies_need_rates(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"items\.csv column currency: prices are in EUR, USD"):
        load_shop(shop(tmp_path, INTERACTIONS, ITEMS))
    with pytest.raises(LoadError, match="no rate for USD against EUR"):
        load_shop(shop(tmp_path, INTERACTIONS, ITEMS, base_currency="EUR"))


def test_malformed_country_in_interactions(tmp_path: Path) -> None:
    text = "user_id,item_id,timestamp,country\nu,i,1,DE\nu,i,2,Deutschland\n"
    with pytest.raises(LoadError, match="line 3, column country: 'Deutschland' is not an ISO 3166"):
        load_shop(shop(tmp_path, text))


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    table = pa.table(
        {"user_id": ["a", "b", ""], "item_id": ["x", "y", "z"], "timestamp": [1, 2, 3]}
    )
    pq.write_table(table, tmp_path / "events.parquet")
    with pytest.raises(LoadError, match=r"events\.parquet row 3, column user_id: is empty"):
        load_shop(ShopFiles(interactions=tmp_path / "events.parquet"))


def test_synthetic_source_is_the_store() -> None:
    config = StoreConfig(n_items=300, n_users=50, n_events=2_000, seed=1)
    loaded = SyntheticSource(config).load()
    assert isinstance(loaded.dataset, Dataset)
    assert loaded.dataset.n_events == 2_000
    assert loaded.reports[0].rows_used == 2_000


def test_ml100k_as_a_dataset() -> None:
    from training.ml100k import WHEEL_NAME, default_cache_dir

    if not (default_cache_dir() / WHEEL_NAME).is_file():
        pytest.skip("the recbole wheel is not cached (training.ml100k.fetch_wheel downloads it)")
    from training.loaders import ML100KSource

    ds = ML100KSource().load().dataset
    assert (ds.n_users, ds.n_items, ds.n_events) == (943, 1682, 100_000)
    assert np.all(np.diff(ds.ev_ts) >= 0)
    assert ds.category_names[0] == "movies" and np.all(ds.category_parent[1:] == 0)
    assert ds.item_countries.all()
