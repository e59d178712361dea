"""Datasets behind one interface: the synthetic store, MovieLens-100K, or a shop's files."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from server.artifact import MAX_TAGS
from training.data import (
    ADD_TO_CART,
    DESKTOP,
    DEVICE_UNSPECIFIED,
    MOBILE,
    PURCHASE,
    TABLET,
    VIEW,
    Dataset,
)
from training.synthetic import StoreConfig, generate_store

logger = logging.getLogger(__name__)

OnInvalid = Literal["raise", "skip"]

# Interaction event names a shop export may use, by Dataset event type.
EVENT_TYPES: dict[str, int] = {
    **dict.fromkeys(("view", "page_view", "pageview", "detail_view", "product_view"), VIEW),
    **dict.fromkeys(("add_to_cart", "addtocart", "add-to-cart", "cart"), ADD_TO_CART),
    **dict.fromkeys(("purchase", "order", "buy", "transaction", "sale"), PURCHASE),
    "0": VIEW,
    "1": ADD_TO_CART,
    "2": PURCHASE,
}
# Events that say nothing about interest in an item: skipped and counted.
IGNORED_EVENT_TYPES = frozenset(
    (
        "impression",
        "search",
        "remove_from_cart",
        "wishlist",
        "click",
        "recommendation_impression",
        "recommendation_click",
    )
)
DEVICES: dict[str, int] = {
    **dict.fromkeys(("mobile", "phone", "smartphone", "1"), MOBILE),
    **dict.fromkeys(("tablet", "2"), TABLET),
    **dict.fromkeys(("desktop", "pc", "computer", "laptop", "3"), DESKTOP),
}
_TRUE = frozenset(("true", "t", "yes", "y", "1"))
_FALSE = frozenset(("false", "f", "no", "n", "0"))
_NUMBER = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?"
_ZONE = r"(Z|[+-]\d{2}:?\d{2})$"
_COUNTRY = r"^[A-Z]{2}$"
_CURRENCY = r"^[A-Z]{3}$"
# Unix times above these are read as milliseconds / microseconds (year 5138 in seconds).
_MS_FROM, _US_FROM = 1e11, 1e14
_MAX_TS = 4_102_444_800  # 2100-01-01: later times are typos
INTERACTION_COLUMNS = (
    "user_id",
    "item_id",
    "timestamp",
    "event_type",
    "rating",
    "device",
    "country",
)
ITEM_COLUMNS = (
    "item_id", "category", "brand", "price", "currency", "countries", "in_stock", "tags",
)  # fmt: skip
_CATEGORY_SEPARATORS = re.compile(r"\s*(?:/|>|\|)\s*")
_COUNTRY_SEPARATORS = re.compile(r"[\s|;,]+")
UNKNOWN = "unknown"


class LoadError(ValueError):
    """A file cannot be read as the format says: names the file, line and column."""

    def __init__(
        self,
        file: str,
        line: int | None,
        column: str | None,
        message: str,
        *,
        unit: str = "line",
    ) -> None:
        """unit is "line" for text files (the header is line 1), "row" for Parquet (1-based)."""
        super().__init__(f"{_where(file, line, column, unit)}: {message}")
        self.file, self.line, self.column, self.reason = file, line, column, message


def _where(file: str, line: int | None, column: str | None, unit: str = "line") -> str:
    where = file if line is None else f"{file} {unit} {line}"
    if column is not None:
        where += f", column {column}" if line is not None else f" column {column}"
    return where


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a loader read, used and left out, and why; nothing is dropped uncounted.

    skipped: rows left out, by reason; examples: the first such row per reason
    ("file line N, column c: ..."); notes: values read with a default, by kind
    (the row is kept).
    """

    source: str
    rows_read: int
    rows_used: int
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "skipped": dict(self.skipped),
            "examples": dict(self.examples),
            "notes": dict(self.notes),
        }

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"{self.source}: read {self.rows_read:,} rows, used {self.rows_used:,}"]
        for reason, count in sorted(self.skipped.items()):
            example = self.examples.get(reason, "")
            out.append(
                f"  skipped {count:,}: {reason}" + (f" (first: {example})" if example else "")
            )
        for note, count in sorted(self.notes.items()):
            out.append(f"  note {count:,}: {note}")
        return out


@dataclass(frozen=True, slots=True)
class Loaded:
    """A Dataset and the report of how it was read (one per input file)."""

    dataset: Dataset
    reports: tuple[LoadReport, ...]


class Source(Protocol):
    """Anything that yields a Dataset: `load()` reads or generates it."""

    @property
    def name(self) -> str: ...

    def load(self) -> Loaded: ...


@dataclass(frozen=True, slots=True)
class SyntheticSource:
    """The built-in synthetic store (training.synthetic)."""

    config: StoreConfig = field(default_factory=StoreConfig)

    @property
    def name(self) -> str:
        return f"{self.config.name}-{self.config.seed}"

    def load(self) -> Loaded:
        dataset = generate_store(self.config)
        report = LoadReport(
            source=f"synthetic store {self.config}",
            rows_read=dataset.n_events,
            rows_used=dataset.n_events,
        )
        return Loaded(dataset, (report,))


@dataclass(frozen=True, slots=True)
class ML100KSource:
    """MovieLens-100K from the recbole wheel (training.ml100k) as a Dataset.

    Every rating is a view; an item's category is its rarest genre under a
    "movies" root, its brand the release decade; prices are 1.0 and there is
    one country (US) and no device.
    """

    cache_dir: Path | None = None

    @property
    def name(self) -> str:
        return "ml100k"

    def load(self) -> Loaded:
        from training.ml100k import load_ml100k

        data = load_ml100k(self.cache_dir)
        dataset = ml100k_dataset(data)
        report = LoadReport(
            source="ml-100k (recbole 1.2.1 wheel)",
            rows_read=data.n_interactions,
            rows_used=dataset.n_events,
        )
        return Loaded(dataset, (report,))


def ml100k_dataset(data: Any) -> Dataset:
    """The Dataset of a training.ml100k.ML100K (see ML100KSource)."""
    genres = np.asarray(data.item_genres, dtype=np.bool_)
    n_items = int(data.item_ids.shape[0])
    genre_count = genres.sum(axis=0)
    # The rarest genre is the most specific one; items without a genre go to "unknown".
    rarity = np.where(genres, genre_count[None, :], np.iinfo(np.int64).max)
    leaf = np.where(genres.any(axis=1), np.argmin(rarity, axis=1), len(data.genre_names))
    category_names = ("movies", *(f"movies/{g}" for g in data.genre_names), f"movies/{UNKNOWN}")
    parent = np.array([-1] + [0] * (len(category_names) - 1), dtype=np.int32)
    decade = np.where(data.item_year > 0, data.item_year // 10 * 10, -1)
    decades = sorted(set(decade.tolist()))
    brand_names = tuple(f"{d}s" if d >= 0 else UNKNOWN for d in decades)
    brand = np.searchsorted(np.asarray(decades), decade).astype(np.int32)
    user_index = np.searchsorted(data.user_ids, data.user_id)
    item_index = np.searchsorted(data.item_ids, data.item_id)
    order = np.argsort(data.timestamp, kind="stable")
    n_users = int(data.user_ids.shape[0])
    return Dataset(
        name="ml100k",
        item_ids=data.item_ids.astype(np.str_),
        item_category=(1 + leaf).astype(np.int32),
        item_brand=brand,
        item_price=np.ones(n_items, dtype=np.float64),
        item_in_stock=np.ones(n_items, dtype=np.bool_),
        item_countries=np.ones((n_items, 1), dtype=np.bool_),
        category_names=category_names,
        category_parent=parent,
        brand_names=brand_names,
        country_codes=("US",),
        base_currency="USD",
        currency_rates={"USD": 1.0},
        user_ids=data.user_ids.astype(np.str_),
        user_country=np.zeros(n_users, dtype=np.int16),
        user_device=np.zeros(n_users, dtype=np.int8),
        ev_user=user_index[order].astype(np.int32),
        ev_item=item_index[order].astype(np.int32),
        ev_ts=data.timestamp[order].astype(np.int64),
        ev_type=np.full(order.size, VIEW, dtype=np.int8),
        ev_device=np.zeros(order.size, dtype=np.int8),
        ev_country=np.zeros(order.size, dtype=np.int16),
    )


@dataclass(frozen=True, slots=True)
class ShopFiles:
    """A shop's own export: interactions CSV/Parquet plus an optional items CSV/Parquet.

    interactions: `user_id,item_id,timestamp[,event_type][,rating][,device][,country]`;
    other columns are ignored. timestamp is unix seconds (milliseconds and
    microseconds are recognised by size) or an ISO 8601 date/time (UTC unless
    it has an offset). event_type names view / add_to_cart / purchase (or
    0/1/2, or a synonym in EVENT_TYPES); impressions, searches and the like are
    skipped and counted. Missing event_type means view. device is mobile /
    tablet / desktop; country an ISO 3166 alpha-2 code.

    items: `item_id[,category][,brand][,price][,currency][,countries][,in_stock][,tags]`;
    category may be a path ("fashion/shoes" or "Fashion > Shoes"); countries
    a list of ISO codes separated by | ; , or spaces (empty or * = everywhere);
    tags merchandising tags (e.g. "high_margin|clearance") separated by | ; or
    , (at most 64 distinct, for boost and bury rules).
    Prices in several currencies need `currency_rates` (units per 1
    `base_currency`). Interactions on items missing from the items file are
    skipped and counted.

    CSV files (or TSV, or either compressed: .gz, .bz2, .zst) have a header
    line and one row per line (no line breaks inside quoted values).

    on_invalid="raise" stops at the first malformed value with a LoadError
    naming file, line and column; "skip" leaves such rows out, counted by
    reason in the report. Rows read in chunks of `chunk_rows`: memory grows
    with the rows kept (a few bytes per column), not with the file.
    """

    interactions: Path
    items: Path | None = None
    on_invalid: OnInvalid = "raise"
    min_rating: float | None = None
    base_currency: str | None = None
    currency_rates: Mapping[str, float] | None = None
    chunk_rows: int = 1 << 20

    def __post_init__(self) -> None:
        if self.on_invalid not in ("raise", "skip"):
            raise ValueError(f"on_invalid must be 'raise' or 'skip', got {self.on_invalid!r}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")

    @property
    def name(self) -> str:
        return _stem(self.interactions)

    def load(self) -> Loaded:
        return load_shop(self)


# ---- reading files in chunks -------------------------------------------------


class _Tally:
    """Rows read, rows skipped by reason (with the first example), and notes, for one file."""

    def __init__(self, file: str, on_invalid: OnInvalid) -> None:
        self.file, self.on_invalid = file, on_invalid
        self.rows_read = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.notes: Counter[str] = Counter()

    def skip(self, reason: str, count: int, example: str) -> None:
        if count:
            self.skipped[reason] += count
            self.examples.setdefault(reason, example)

    def note(self, what: str, count: int) -> None:
        if count:
            self.notes[what] += count

    def report(self, rows_used: int) -> LoadReport:
        return LoadReport(
            source=self.file,
            rows_read=self.rows_read,
            rows_used=rows_used,
            skipped=dict(self.skipped),
            examples=dict(self.examples),
            notes=dict(self.notes),
        )


class _Reader:
    """A CSV or Parquet file's rows in batches of text columns, each row's line known."""

    def __init__(
        self, path: Path, wanted: tuple[str, ...], required: tuple[str, ...], rows: int
    ) -> None:
        self.path, self.file = path, path.name
        if not path.is_file():
            raise LoadError(str(path), None, None, "no such file")
        self.parquet = _is_parquet(path)
        self.unit = "row" if self.parquet else "line"
        self.delimiter = ","
        header = self._parquet_header() if self.parquet else self._csv_header()
        missing = [c for c in required if c not in header]
        if missing:
            raise LoadError(
                self.file,
                None if self.parquet else 1,
                None,
                f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"(the header has: {', '.join(header) or 'nothing'})",
                unit=self.unit,
            )
        self.header = header
        self.columns = tuple(c for c in wanted if c in header)
        self.ignored = tuple(c for c in header if c not in wanted)
        self.rows = rows
        self.done = 0  # data rows yielded so far
        # CSV lines with the wrong number of fields: (line, text), as the parser meets them.
        self.bad_lines: list[tuple[int, str]] = []

    def _csv_header(self) -> list[str]:
        try:
            with pa.input_stream(str(self.path), compression="detect") as stream:
                head = stream.read(1 << 16).decode("utf-8-sig", errors="replace")
        except (OSError, pa.ArrowInvalid) as exc:
            raise LoadError(self.file, None, None, f"cannot be read: {exc}") from exc
        line = head.splitlines()[0] if head else ""
        self.delimiter = "\t" if "\t" in line and "," not in line else ","
        names = next(csv.reader(io.StringIO(line), delimiter=self.delimiter), [])
        return [n.strip() for n in names]

    def _parquet_header(self) -> list[str]:
        try:
            self._pq = pq.ParquetFile(str(self.path))
        except (pa.ArrowInvalid, OSError) as exc:
            raise LoadError(self.file, None, None, f"not a readable Parquet file: {exc}") from exc
        return [str(n) for n in self._pq.schema_arrow.names]

    def line_of(self, row: int) -> int:
        """The line (CSV; the header is line 1) or 1-based row (Parquet) of data row `row`."""
        if self.parquet:
            return row + 1
        line = row + 2
        for skipped in sorted(n for n, _ in self.bad_lines):
            if skipped <= line:
                line += 1
        return line

    def where(self, row: int, column: str | None) -> str:
        return _where(self.file, self.line_of(row), column, self.unit)

    def batches(self) -> Iterator[dict[str, pa.Array]]:
        """Batches of the wanted columns; self.done counts the rows before the next one."""
        source = self._parquet_batches() if self.parquet else self._csv_batches()
        while True:
            try:
                batch = next(source)
            except StopIteration:
                return
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise LoadError(self.file, None, None, f"cannot be parsed: {exc}") from exc
            yield {name: batch.column(name) for name in self.columns}
            self.done += batch.num_rows

    def _csv_batches(self) -> Iterator[pa.RecordBatch]:
        def invalid(row: Any) -> str:
            self.bad_lines.append((int(row.number or 0), str(row.text)))
            return "skip"

        reader = pa_csv.open_csv(
            str(self.path),
            # One thread: the invalid-row handler then knows each row's line number.
            read_options=pa_csv.ReadOptions(
                block_size=max(1 << 16, self.rows * 48), use_threads=False
            ),
            # Empty lines stay rows (of empty values) so that line numbers stay right.
            parse_options=pa_csv.ParseOptions(
                delimiter=self.delimiter, invalid_row_handler=invalid, ignore_empty_lines=False
            ),
            # Everything as text: values are validated here, not guessed by type inference.
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(self.columns, pa.string()),
                include_columns=list(self.columns),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        yield from reader

    def _parquet_batches(self) -> Iterator[pa.RecordBatch]:
        yield from self._pq.iter_batches(batch_size=self.rows, columns=list(self.columns))

    def field_count_error(self, upto_line: float) -> LoadError | None:
        """The first line before `upto_line` with the wrong number of fields, as an error."""
        lines = [b for b in self.bad_lines if b[0] < upto_line]
        if not lines:
            return None
        line, text = min(lines)
        got = len(next(csv.reader(io.StringIO(text), delimiter=self.delimiter), []))
        return LoadError(
            self.file,
            line,
            None,
            f"has {got} fields, the header has {len(self.header)}: {text[:80]!r}",
        )

    def count_field_errors(self, tally: _Tally) -> None:
        if self.bad_lines:
            line, text = min(self.bad_lines)
            tally.skip(
                "wrong number of fields",
                len(self.bad_lines),
                f"{_where(self.file, line, None)}: {text[:80]!r}",
            )


class _Checks:
    """Bad-value masks for one batch: raise at the first, or drop and count them all."""

    def __init__(self, reader: _Reader, size: int, tally: _Tally) -> None:
        self.reader, self.size, self.tally = reader, size, tally
        self.problems: list[tuple[str, npt.NDArray[np.bool_], pa.Array, str]] = []
        self.keep = np.ones(size, dtype=np.bool_)

    def bad(self, column: str, mask: npt.NDArray[np.bool_], values: pa.Array, message: str) -> None:
        """Rows where `mask` is True hold a malformed value; message has a {value} field."""
        mask = mask & self.keep
        if mask.any():
            self.problems.append((column, mask, values, message))

    def skip(self, reason: str, mask: npt.NDArray[np.bool_], column: str | None = None) -> None:
        """Rows where `mask` is True are well-formed but left out, counted under `reason`."""
        self.finish()
        mask = mask & self.keep
        if mask.any():
            row = int(np.argmax(mask))
            self.tally.skip(
                reason, int(mask.sum()), self.reader.where(self.reader.done + row, column)
            )
            self.keep &= ~mask

    def finish(self) -> npt.NDArray[np.bool_]:
        """Rows kept so far; raises the first malformed value if on_invalid is 'raise'."""
        problems, self.problems = self.problems, []
        if not problems:
            return self.keep
        if self.tally.on_invalid == "raise":
            row, column, values, message = min(
                ((int(np.argmax(m)), c, v, msg) for c, m, v, msg in problems),
                key=lambda p: p[0],
            )
            line = self.reader.line_of(self.reader.done + row)
            earlier = self.reader.field_count_error(line)
            if earlier is not None:
                raise earlier
            raise LoadError(
                self.reader.file,
                line,
                column,
                message.format(value=_show(values[row].as_py())),
                unit=self.reader.unit,
            )
        for column, mask, values, message in problems:
            fresh = mask & self.keep
            if fresh.any():
                row = int(np.argmax(fresh))
                example = f"{self.reader.where(self.reader.done + row, column)}: " + message.format(
                    value=_show(values[row].as_py())
                )
                self.tally.skip(_reason(column, message), int(fresh.sum()), example)
                self.keep &= ~fresh
        return self.keep


def _reason(column: str, message: str) -> str:
    """A skip reason: the message without the offending value ("timestamp: not a ...")."""
    for lead in ("{value} is ", "{value} ", "is "):
        message = message.removeprefix(lead)
    return f"{column}: {message}"


def _show(value: object) -> str:
    return repr(value if value is not None else "")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".zst", ".csv", ".tsv", ".txt", ".parquet", ".pq"):
        name = name.removesuffix(suffix)
    return name


def _text(col: pa.Array) -> pa.Array:
    """A column as trimmed strings; nulls become ''."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        if pa.types.is_timestamp(col.type):
            col = pc.strftime(col, format="%Y-%m-%dT%H:%M:%S")
        col = pc.cast(col, pa.string())
    return pc.fill_null(pc.utf8_trim_whitespace(col), "")


def _np(arr: pa.Array) -> npt.NDArray[Any]:
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _match(text: pa.Array, pattern: str) -> npt.NDArray[np.bool_]:
    return _np(pc.fill_null(pc.match_substring_regex(text, pattern), False)).astype(np.bool_)


def _empty(text: pa.Array) -> npt.NDArray[np.bool_]:
    return _np(pc.equal(pc.utf8_length(text), 0)).astype(np.bool_)


def _numbers(text: pa.Array) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """(values, ok): float64 of each decimal number; ok False where the text is not one."""
    ok = _match(text, _NUMBER)
    values = _np(pc.cast(pc.if_else(pa.array(ok), text, "nan"), pa.float64())).astype(np.float64)
    ok &= np.isfinite(values)
    return values, ok


def _unix_seconds(
    col: pa.Array,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(seconds, unparsed, out_of_range) of a timestamp column: numbers or ISO 8601 text."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_timestamp(col.type):
        seconds = _np(pc.cast(pc.cast(col, pa.timestamp("s", tz=col.type.tz)), pa.int64()))
        unparsed = _np(pc.is_null(col)).astype(np.bool_)
        values = np.where(unparsed, 0, np.nan_to_num(seconds.astype(np.float64))).astype(np.float64)
    elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        values = _np(pc.fill_null(pc.cast(col, pa.float64()), np.nan)).astype(np.float64)
        unparsed = ~np.isfinite(values)
    else:
        text = _text(col)
        values, numeric = _numbers(text)
        iso = _match(text, _ISO_DATE + "(" + _ZONE[:-1] + ")?$") & ~numeric
        values = np.where(numeric, values, np.nan)
        if iso.any():
            values[iso] = _iso_seconds(pc.filter(text, pa.array(iso)))
        unparsed = ~np.isfinite(values)
    values = np.where(unparsed, 0.0, values)
    # Exports often write milliseconds or microseconds; seconds this large would be year 5138+.
    values = np.where(
        values >= _US_FROM, values / 1e6, np.where(values >= _MS_FROM, values / 1e3, values)
    )
    out_of_range = ~unparsed & ((values < 0) | (values >= _MAX_TS))
    return np.floor(values).astype(np.int64), unparsed, out_of_range


def _iso_seconds(text: pa.Array) -> npt.NDArray[np.float64]:
    """Seconds since the epoch of ISO 8601 strings (UTC unless offset); NaN where invalid."""
    zoned = _match(text, _ZONE)
    out = np.full(len(text), np.nan)
    for has_zone in (False, True):
        rows = np.flatnonzero(zoned == has_zone)
        if rows.size == 0:
            continue
        part = text.take(pa.array(rows))
        target = pa.timestamp("ns", tz="UTC") if has_zone else pa.timestamp("ns")
        try:
            out[rows] = _np(pc.cast(pc.cast(part, target), pa.int64())) / 1e9
        except pa.ArrowInvalid:
            # Well-shaped but impossible dates (2026-02-30): find them one by one.
            for r, value in zip(rows.tolist(), part.to_pylist(), strict=True):
                try:
                    stamp = pc.cast(pa.array([value]), target)
                except pa.ArrowInvalid:
                    continue
                out[r] = _np(pc.cast(stamp, pa.int64()))[0] / 1e9
    return out


# ---- the shop format ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Catalog:
    """The items file, validated: one row per item, prices in the base currency."""

    ids: pa.Array  # string (n,), unique, file order
    category: pa.Array  # string (n,), "" = unknown
    brand: pa.Array  # string (n,)
    price: npt.NDArray[np.float64]
    in_stock: npt.NDArray[np.bool_]
    countries: pa.Array  # list<string> (n,); empty list = everywhere
    tags: pa.Array  # list<string> (n,)
    base_currency: str
    currency_rates: dict[str, float]
    report: LoadReport


def _read_items(files: ShopFiles) -> _Catalog:
    assert files.items is not None
    reader = _Reader(files.items, ITEM_COLUMNS, ("item_id",), files.chunk_rows)
    tally = _Tally(reader.file, files.on_invalid)
    cols = reader.columns
    kept: dict[str, list[Any]] = {
        n: []
        for n in ("ids", "category", "brand", "price", "ccy", "in_stock", "cty", "tags", "line")
    }
    for batch in reader.batches():
        size = len(batch["item_id"])
        tally.rows_read += size
        text = {name: _text(col) for name, col in batch.items()}
        checks = _Checks(reader, size, tally)
        blank = np.logical_and.reduce([_empty(t) for t in text.values()])
        checks.skip("empty line", blank)
        ids = text["item_id"]
        checks.bad("item_id", _empty(ids), ids, "is empty")
        price = np.ones(size)
        if "price" in cols:
            price, ok = _numbers(text["price"])
            checks.bad(
                "price", ~(ok & (price > 0)), text["price"], "{value} is not a positive number"
            )
        currency = (
            pa.array([""] * size) if "currency" not in cols else pc.utf8_upper(text["currency"])
        )
        if "currency" in cols:
            bad = ~_match(currency, _CURRENCY) & ~_empty(currency)
            checks.bad(
                "currency", bad, text["currency"], "{value} is not an ISO 4217 code like EUR"
            )
        in_stock = np.ones(size, dtype=np.bool_)
        if "in_stock" in cols:
            flag = pc.utf8_lower(text["in_stock"])
            yes = _np(pc.is_in(flag, value_set=pa.array(sorted(_TRUE)))).astype(np.bool_)
            no = _np(pc.is_in(flag, value_set=pa.array(sorted(_FALSE)))).astype(np.bool_)
            empty = _empty(flag)
            checks.bad(
                "in_stock", ~(yes | no | empty), text["in_stock"], "{value} is not true or false"
            )
            tally.note("in_stock empty: read as true", int((empty & checks.keep).sum()))
            in_stock = ~no
        if "countries" in cols:
            codes = pc.split_pattern_regex(pc.utf8_upper(text["countries"]), r"[\s|;,]+")
            flat = pc.list_flatten(codes)
            parent = _np(pc.list_parent_indices(codes)).astype(np.int64)
            wrong = ~_match(flat, _COUNTRY) & ~_np(pc.is_in(flat, value_set=pa.array(["", "*"])))
            bad_rows = np.zeros(size, dtype=np.bool_)
            bad_rows[parent[wrong]] = True
            checks.bad(
                "countries",
                bad_rows,
                text["countries"],
                "{value} is not a list of ISO country codes",
            )
            countries = codes  # "" and "*" entries mean everywhere
        else:
            countries = pa.array([[]] * size, type=pa.list_(pa.string()))
        if "tags" in cols:
            # Empty entries are dropped with the vocabulary (_item_tags).
            tags = pc.split_pattern_regex(pc.utf8_trim_whitespace(text["tags"]), r"\s*[|;,]\s*")
        else:
            tags = pa.array([[]] * size, type=pa.list_(pa.string()))
        for name in ("category", "brand"):
            if name in cols:
                tally.note(
                    f"{name} empty: read as {UNKNOWN}",
                    int((_empty(text[name]) & checks.keep).sum()),
                )
        keep = checks.finish()
        mask = pa.array(keep)
        kept["ids"].append(pc.filter(ids, mask))
        for name in ("category", "brand"):
            kept[name].append(
                pc.filter(text[name], mask) if name in cols else pa.array([""] * int(keep.sum()))
            )
        kept["price"].append(price[keep])
        kept["ccy"].append(pc.filter(currency, mask))
        kept["in_stock"].append(in_stock[keep])
        kept["cty"].append(pc.filter(countries, mask))
        kept["tags"].append(pc.filter(tags, mask))
        kept["line"].append(reader.done + np.flatnonzero(keep))
    error = reader.field_count_error(float("inf"))
    if error is not None and files.on_invalid == "raise":
        raise error
    reader.count_field_errors(tally)
    ids = _concat(kept["ids"], pa.string())
    rows = np.concatenate(kept["line"]) if kept["line"] else np.zeros(0, dtype=np.int64)
    unique = pc.unique(ids)
    first = np.ones(len(ids), dtype=np.bool_)
    if len(unique) < len(ids):
        code = _np(pc.index_in(ids, value_set=unique)).astype(np.int64)
        _, first_row = np.unique(code, return_index=True)
        first[:] = False
        first[first_row] = True
        dup = int(np.argmax(~first))
        original = int(first_row[code[dup]])
        value = ids[dup].as_py()
        message = f"duplicate item_id {value!r} (first on {reader.unit} {reader.line_of(int(rows[original]))})"
        if files.on_invalid == "raise":
            raise LoadError(
                reader.file, reader.line_of(int(rows[dup])), "item_id", message, unit=reader.unit
            )
        tally.skip(
            "item_id: duplicate",
            int((~first).sum()),
            f"{reader.where(int(rows[dup]), 'item_id')}: {message}",
        )
    keep = pa.array(first)
    price = np.concatenate(kept["price"]) if kept["price"] else np.zeros(0)
    currency = _concat(kept["ccy"], pa.string()).filter(keep)
    base, rates = _currencies(files, reader.file, currency)
    rate = _np(pc.fill_null(pc.index_in(currency, value_set=pa.array(list(rates))), 0))
    per_row = np.asarray(list(rates.values()))[rate.astype(np.int64)]
    price = price[first] / np.where(_empty(currency), 1.0, per_row)
    return _Catalog(
        ids=ids.filter(keep),
        category=_concat(kept["category"], pa.string()).filter(keep),
        brand=_concat(kept["brand"], pa.string()).filter(keep),
        price=price,
        in_stock=(np.concatenate(kept["in_stock"]) if kept["in_stock"] else np.zeros(0, np.bool_))[
            first
        ],
        countries=_concat(kept["cty"], pa.list_(pa.string())).filter(keep),
        tags=_concat(kept["tags"], pa.list_(pa.string())).filter(keep),
        base_currency=base,
        currency_rates=rates,
        report=tally.report(int(first.sum())),
    )


def _concat(parts: list[Any], kind: pa.DataType) -> pa.Array:
    if not parts:
        return pa.array([], type=kind)
    return pa.concat_arrays(
        [p.combine_chunks() if isinstance(p, pa.ChunkedArray) else p for p in parts]
    )


def _currencies(files: ShopFiles, file: str, currency: pa.Array) -> tuple[str, dict[str, float]]:
    """The base currency and the rates (units per 1 base unit) every price needs."""
    present = sorted(str(c) for c in pc.unique(currency).to_pylist() if c)
    given = {k.upper(): float(v) for k, v in (files.currency_rates or {}).items()}
    base = (files.base_currency or (present[0] if len(present) == 1 else "")).upper()
    if not base:
        base = next((c for c, r in given.items() if r == 1.0), "")
    if not base and not present:
        base = "USD"
    if not base:
        raise LoadError(
            file,
            None,
            "currency",
            f"prices are in {', '.join(present)}: pass base_currency and currency_rates "
            "(units of each per 1 base unit), e.g. --currency-rates EUR=1,USD=1.08",
        )
    rates = {base: 1.0, **{k: v for k, v in given.items() if k != base}}
    missing = [c for c in present if c not in rates]
    if missing:
        raise LoadError(
            file,
            None,
            "currency",
            f"no rate for {', '.join(missing)} against {base}: pass currency_rates "
            f"(units per 1 {base}), e.g. --currency-rates {missing[0]}=1.1",
        )
    bad = [c for c, r in rates.items() if not (r > 0 and np.isfinite(r))]
    if bad:
        raise ValueError(f"currency_rates must be positive, got {bad[0]}={rates[bad[0]]}")
    return base, rates


@dataclass(frozen=True, slots=True)
class _Events:
    """The interactions file, validated; columns of the kept rows in file order."""

    user: pa.Array  # string (e,)
    item: pa.Array | None  # string (e,) without an items file
    item_row: npt.NDArray[np.int32] | None  # index into the catalog with one
    ts: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    device: npt.NDArray[np.int8]
    country: pa.Array  # string (e,), "" = unknown
    report: LoadReport


def _read_events(files: ShopFiles, catalog: _Catalog | None) -> _Events:
    reader = _Reader(
        files.interactions,
        INTERACTION_COLUMNS,
        ("user_id", "item_id", "timestamp"),
        files.chunk_rows,
    )
    tally = _Tally(reader.file, files.on_invalid)
    if reader.ignored:
        logger.info("%s: ignoring columns %s", reader.file, ", ".join(reader.ignored))
    cols = reader.columns
    parts: dict[str, list[Any]] = {
        n: [] for n in ("user", "item", "row", "ts", "kind", "device", "cty")
    }
    event_names = pa.array(sorted(EVENT_TYPES))
    event_codes = np.asarray([EVENT_TYPES[n] for n in sorted(EVENT_TYPES)], dtype=np.int8)
    device_names = pa.array(sorted(DEVICES))
    device_codes = np.asarray([DEVICES[n] for n in sorted(DEVICES)], dtype=np.int8)
    for batch in reader.batches():
        size = len(batch["user_id"])
        tally.rows_read += size
        text = {name: _text(col) for name, col in batch.items() if name != "timestamp"}
        checks = _Checks(reader, size, tally)
        raw_ts = batch["timestamp"]
        ts_text = _text(raw_ts)
        blank = np.logical_and.reduce([_empty(t) for t in (*text.values(), ts_text)])
        checks.skip("empty line", blank)
        for name in ("user_id", "item_id"):
            checks.bad(name, _empty(text[name]), text[name], "is empty")
        ts, unparsed, out_of_range = _unix_seconds(raw_ts)
        checks.bad("timestamp", unparsed, ts_text, "{value} is not a unix time or ISO date")
        checks.bad("timestamp", out_of_range, ts_text, "{value} is not between 1970 and 2100")
        kind = np.full(size, VIEW, dtype=np.int8)
        ignored = np.zeros(size, dtype=np.bool_)
        if "event_type" in cols:
            name = pc.utf8_lower(text["event_type"])
            at = _np(pc.fill_null(pc.index_in(name, value_set=event_names), -1)).astype(np.int64)
            empty = _empty(name)
            ignored = _np(pc.is_in(name, value_set=pa.array(sorted(IGNORED_EVENT_TYPES)))).astype(
                np.bool_
            )
            checks.bad(
                "event_type",
                (at < 0) & ~empty & ~ignored,
                text["event_type"],
                "{value} is not view, add_to_cart or purchase (or an ignored type such as search)",
            )
            kind = np.where(at >= 0, event_codes[np.maximum(at, 0)], VIEW).astype(np.int8)
            tally.note("event_type empty: read as view", int((empty & checks.keep).sum()))
        rating = None
        if "rating" in cols:
            rating, ok = _numbers(text["rating"])
            empty = _empty(text["rating"])
            checks.bad("rating", ~ok & ~empty, text["rating"], "{value} is not a number")
            tally.note("rating empty", int((empty & checks.keep).sum()))
        device = np.zeros(size, dtype=np.int8)
        if "device" in cols:
            name = pc.utf8_lower(text["device"])
            at = _np(pc.fill_null(pc.index_in(name, value_set=device_names), -1)).astype(np.int64)
            device = np.where(at >= 0, device_codes[np.maximum(at, 0)], DEVICE_UNSPECIFIED).astype(
                np.int8
            )
            tally.note(
                "device empty or not mobile/tablet/desktop: read as unspecified",
                int(((at < 0) & checks.keep).sum()),
            )
        country = pa.array([""] * size, type=pa.string())
        if "country" in cols:
            country = pc.utf8_upper(text["country"])
            empty = _empty(country)
            checks.bad(
                "country",
                ~_match(country, _COUNTRY) & ~empty,
                text["country"],
                "{value} is not an ISO 3166 alpha-2 code like DE",
            )
            tally.note("country empty: read as unknown", int((empty & checks.keep).sum()))
        checks.finish()
        # Well-formed rows the model does not learn from: counted, never silently dropped.
        if ignored.any():
            for kind_name in sorted(
                set(
                    pc.filter(
                        pc.utf8_lower(text["event_type"]), pa.array(ignored & checks.keep)
                    ).to_pylist()
                )
            ):
                which = ignored & _np(
                    pc.equal(pc.utf8_lower(text["event_type"]), kind_name)
                ).astype(np.bool_)
                checks.skip(f"event_type {kind_name}: not an interest signal", which, "event_type")
        if rating is not None and files.min_rating is not None:
            checks.skip(
                f"rating below min_rating {files.min_rating:g}",
                np.nan_to_num(rating, nan=np.inf) < files.min_rating,
                "rating",
            )
        item_row = None
        if catalog is not None:
            at = _np(pc.fill_null(pc.index_in(text["item_id"], value_set=catalog.ids), -1)).astype(
                np.int64
            )
            checks.skip("item_id not in the items file", at < 0, "item_id")
            item_row = at
        keep = checks.finish()
        mask = pa.array(keep)
        parts["user"].append(pc.filter(text["user_id"], mask))
        if item_row is None:
            parts["item"].append(pc.filter(text["item_id"], mask))
        else:
            parts["row"].append(item_row[keep].astype(np.int32))
        parts["ts"].append(ts[keep])
        parts["kind"].append(kind[keep])
        parts["device"].append(device[keep])
        parts["cty"].append(pc.filter(country, mask))
    error = reader.field_count_error(float("inf"))
    if error is not None and files.on_invalid == "raise":
        raise error
    reader.count_field_errors(tally)
    ts_all = np.concatenate(parts["ts"]) if parts["ts"] else np.zeros(0, np.int64)
    return _Events(
        user=_concat(parts["user"], pa.string()),
        item=None if catalog is not None else _concat(parts["item"], pa.string()),
        item_row=np.concatenate(parts["row"])
        if catalog is not None and parts["row"]
        else (np.zeros(0, np.int32) if catalog is not None else None),
        ts=ts_all,
        kind=np.concatenate(parts["kind"]) if parts["kind"] else np.zeros(0, np.int8),
        device=np.concatenate(parts["device"]) if parts["device"] else np.zeros(0, np.int8),
        country=_concat(parts["cty"], pa.string()),
        report=tally.report(int(ts_all.size)),
    )


def _codes(values: pa.Array, vocabulary: pa.Array) -> npt.NDArray[np.int64]:
    """Index of each value in the vocabulary (-1 if absent)."""
    return _np(pc.fill_null(pc.index_in(values, value_set=vocabulary), -1)).astype(np.int64)


def _sorted_unique(values: pa.Array) -> pa.Array:
    unique = pc.unique(values)
    return unique.take(pc.sort_indices(unique))


def _to_str(values: pa.Array) -> npt.NDArray[np.str_]:
    # One Python string per distinct id (users, items), never per event.
    return np.asarray(values.to_pylist(), dtype=np.str_).reshape(-1)


def _category_tree(
    paths: list[str],
) -> tuple[tuple[str, ...], npt.NDArray[np.int32], dict[str, int]]:
    """(names, parent, node of each path): every prefix of a path is a category."""
    names: list[str] = []
    parent: list[int] = []
    node: dict[str, int] = {}
    leaf_of: dict[str, int] = {}
    for path in paths:
        parts = [p for p in _CATEGORY_SEPARATORS.split(path.strip()) if p] or [UNKNOWN]
        up = -1
        for depth in range(len(parts)):
            key = "/".join(parts[: depth + 1])
            if key not in node:
                node[key] = len(names)
                names.append(key)
                parent.append(up)
            up = node[key]
        leaf_of[path] = up
    return tuple(names), np.asarray(parent, dtype=np.int32), leaf_of


def _item_tags(
    catalog: _Catalog, files: ShopFiles
) -> tuple[npt.NDArray[np.uint64] | None, tuple[str, ...]]:
    """Per item a bit per merchandising tag (vocabulary sorted); (None, ()) if untagged."""
    flat = np.asarray(pc.list_flatten(catalog.tags).to_pylist(), dtype=np.str_)
    owner = _np(pc.list_parent_indices(catalog.tags)).astype(np.int64)
    named = flat != ""
    if not named.any():
        return None, ()
    names, code = np.unique(flat[named], return_inverse=True)
    if names.shape[0] > MAX_TAGS:
        raise LoadError(
            Path(str(files.items)).name,
            None,
            "tags",
            f"at most {MAX_TAGS} distinct tags, got {names.shape[0]}",
        )
    bits = np.zeros(len(catalog.ids), dtype=np.uint64)
    np.bitwise_or.at(bits, owner[named], np.left_shift(np.uint64(1), code.astype(np.uint64)))
    return bits, tuple(str(t) for t in names)


def load_shop(files: ShopFiles) -> Loaded:
    """Read a shop's interactions (and items) into a Dataset; see ShopFiles."""
    catalog = _read_items(files) if files.items is not None else None
    events = _read_events(files, catalog)
    if events.ts.size == 0:
        raise LoadError(
            events.report.source, None, None, "no usable interactions" + _why(events.report)
        )
    # Items: the catalog's, or those the interactions name.
    if catalog is not None:
        item_ids = catalog.ids
        ev_item = events.item_row
        assert ev_item is not None
    else:
        assert events.item is not None
        item_ids = _sorted_unique(events.item)
        ev_item = _codes(events.item, item_ids).astype(np.int32)
    n_items = len(item_ids)
    user_ids = _sorted_unique(events.user)
    ev_user = _codes(events.user, user_ids).astype(np.int32)
    # Countries: those items ship to and those shoppers are in.
    item_codes = (
        pa.array([], pa.string()) if catalog is None else pc.list_flatten(catalog.countries)
    )
    known = (
        pc.filter(item_codes, pc.match_substring_regex(item_codes, _COUNTRY))
        if len(item_codes)
        else item_codes
    )
    country_vocab = _sorted_unique(
        pa.concat_arrays(
            [pc.filter(events.country, pc.invert(pc.equal(events.country, ""))), known]
        )
    )
    country_codes = tuple(str(c) for c in country_vocab.to_pylist())
    n_countries = len(country_codes)
    country_code = _codes(events.country, country_vocab)
    ev_country = np.where(country_code < 0, n_countries, country_code).astype(np.int16)  # unknown
    item_countries = np.ones((n_items, n_countries), dtype=np.bool_)
    if catalog is not None and n_countries:
        lists = catalog.countries
        flat = pc.list_flatten(lists)
        owner = _np(pc.list_parent_indices(lists)).astype(np.int64)
        at = _codes(flat, country_vocab)
        listed = at >= 0
        restricted = np.zeros(n_items, dtype=np.bool_)
        restricted[owner[listed]] = True
        item_countries[restricted] = False
        item_countries[owner[listed], at[listed]] = True
    # Events by time; each shopper's country and device: the latest known.
    order = np.argsort(events.ts, kind="stable")
    ev_user, ev_item, ev_ts = ev_user[order], ev_item[order], events.ts[order]
    ev_type, ev_device, ev_country = events.kind[order], events.device[order], ev_country[order]
    n_users = len(user_ids)
    user_country = _latest(
        ev_user, ev_country, ev_country < n_countries, n_users, n_countries
    ).astype(np.int16)
    user_device = _latest(ev_user, ev_device, ev_device > 0, n_users, DEVICE_UNSPECIFIED).astype(
        np.int8
    )
    item_tags, tag_names = _item_tags(catalog, files) if catalog is not None else (None, ())
    if catalog is not None:
        categories = [str(c) for c in catalog.category.to_pylist()]
        distinct = sorted(set(categories))
        names, parent, leaf_of = _category_tree(distinct)
        item_category = np.asarray([leaf_of[c] for c in categories], dtype=np.int32)
        brand_vocab = _sorted_unique(catalog.brand)
        brand_names = tuple(str(b) or UNKNOWN for b in brand_vocab.to_pylist())
        item_brand = _codes(catalog.brand, brand_vocab).astype(np.int32)
        price, in_stock = catalog.price, catalog.in_stock
        base, rates = catalog.base_currency, catalog.currency_rates
    else:
        names, parent = (UNKNOWN,), np.full(1, -1, dtype=np.int32)
        item_category = np.zeros(n_items, dtype=np.int32)
        brand_names, item_brand = (UNKNOWN,), np.zeros(n_items, dtype=np.int32)
        price, in_stock = np.ones(n_items), np.ones(n_items, dtype=np.bool_)
        base = (files.base_currency or "USD").upper()
        rates = {base: 1.0}
    dataset = Dataset(
        name=files.name,
        item_ids=_to_str(item_ids),
        item_category=item_category,
        item_brand=item_brand,
        item_price=np.asarray(price, dtype=np.float64),
        item_in_stock=np.asarray(in_stock, dtype=np.bool_),
        item_countries=item_countries,
        category_names=names,
        category_parent=parent,
        brand_names=brand_names,
        country_codes=country_codes,
        base_currency=base,
        currency_rates=rates,
        user_ids=_to_str(user_ids),
        user_country=user_country,
        user_device=user_device,
        ev_user=ev_user,
        ev_item=ev_item.astype(np.int32),
        ev_ts=ev_ts,
        ev_type=ev_type,
        ev_device=ev_device,
        ev_country=ev_country,
        item_tags=item_tags,
        tag_names=tag_names,
    )
    reports = (events.report,) if catalog is None else (catalog.report, events.report)
    for report in reports:
        for line in report.lines():
            logger.info("%s", line)
    return Loaded(dataset.clustered(), reports)


def _why(report: LoadReport) -> str:
    if not report.skipped:
        return ""
    return " (" + ", ".join(f"{n:,} skipped: {r}" for r, n in report.skipped.items()) + ")"


def _latest(
    user: npt.NDArray[np.int32],
    value: npt.NDArray[Any],
    known: npt.NDArray[np.bool_],
    n_users: int,
    default: int,
) -> npt.NDArray[np.int64]:
    """Per user, `value` of their latest event where `known` (events are time-sorted)."""
    out = np.full(n_users, default, dtype=np.int64)
    rows = np.flatnonzero(known)
    if rows.size:
        # The last row per user among the known ones: stable sort by user keeps time order.
        by_user = rows[np.argsort(user[rows], kind="stable")]
        users = user[by_user]
        last = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
        out[users[last]] = value[by_user[last]]
    return out
