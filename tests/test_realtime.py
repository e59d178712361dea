"""The real-time loop over real gRPC: events, recently viewed, popularity, live catalog,
reload and forgetting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import ServerThread, TrainedStore, make_settings
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.artifact import load_artifact
from server.domain.engine import Engine
from server.domain.query import Context, Profile
from server.state.eventlog import read_events

Device = pb.RequestContext.Device
Prov = pb.RecommendedItem.Provenance
E = pb.Event


@pytest.fixture(scope="module")
def live(trained: TrainedStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server of its own (these tests change state), with a durable event log."""
    log_dir = tmp_path_factory.mktemp("events")
    thread = ServerThread(make_settings(trained.artifacts, event_log=str(log_dir)))
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def rt(live: ServerThread) -> Iterator[pb_grpc.RecommenderStub]:
    with grpc.insecure_channel(live.target) as channel:
        yield pb_grpc.RecommenderStub(channel)


def items_of(ds_items: np.ndarray, mask: np.ndarray, n: int) -> list[str]:
    return [str(i) for i in ds_items[mask][:n]]


def ev(kind: int, item: str = "", *, session: str = "", user: str = "", **kw: object) -> pb.Event:
    ctx = pb.RequestContext(session_id=session, user_id=user, country="DE", device=Device.MOBILE)
    return pb.Event(type=kind, item_id=item, context=ctx, **kw)  # type: ignore[arg-type]


def test_bad_events_are_rejected_good_ones_kept(
    rt: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    item = str(trained.dataset.item_ids[0])
    reply = rt.TrackEvents(
        pb.TrackEventsRequest(
            events=[
                ev(E.VIEW, item, session="s-mixed"),
                ev(E.VIEW, "no-such-item", session="s-mixed", event_id="e2"),
                pb.Event(type=E.VIEW, item_id=item),  # nobody
                ev(E.PURCHASE, item, session="s-mixed", price=-3),
                ev(99, item, session="s-mixed"),
                ev(E.RECOMMENDATION_CLICK, item, session="s-mixed"),  # no recommendation_id
                ev(E.SEARCH, session="s-mixed", query="red shoes"),
            ]
        )
    )
    assert reply.accepted == 2
    by_index = {r.index: r for r in reply.rejected}
    assert set(by_index) == {1, 2, 3, 4, 5}
    assert by_index[1].field == "events[1].item_id" and by_index[1].event_id == "e2"
    assert by_index[2].field == "events[2].context.user_id"
    assert by_index[3].field == "events[3].price"
    assert by_index[4].field == "events[4].type"
    assert by_index[5].field == "events[5].recommendation_id"


def test_empty_batch_is_invalid(rt: pb_grpc.RecommenderStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        rt.TrackEvents(pb.TrackEventsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("events")


def test_recently_viewed_newest_first(rt: pb_grpc.RecommenderStub, trained: TrainedStore) -> None:
    ds = trained.dataset
    viewed = items_of(
        ds.item_ids, ds.item_in_stock & ds.item_countries[:, ds.country_codes.index("DE")], 4
    )
    rt.TrackEvents(
        pb.TrackEventsRequest(events=[ev(E.VIEW, i, session="s-recent") for i in viewed])
    )
    reply = rt.RecentlyViewed(
        pb.RecentlyViewedRequest(context=pb.RequestContext(session_id="s-recent", country="DE"))
    )
    assert [i.item_id for i in reply.items] == viewed[::-1]
    assert all(i.provenance == Prov.RECENTLY_VIEWED for i in reply.items)
    with pytest.raises(grpc.RpcError) as err:
        rt.RecentlyViewed(pb.RecentlyViewedRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_next_recommend_reflects_the_last_event(
    rt: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ds = trained.dataset
    ctx = pb.RequestContext(session_id="s-fresh", country="DE", device=Device.MOBILE)
    before = rt.Recommend(pb.RecommendRequest(context=ctx, num_results=20))
    assert not before.personalized
    de = ds.item_countries[:, ds.country_codes.index("DE")] & ds.item_in_stock
    target_cat = int(np.bincount(ds.item_category[de]).argmax())
    seen = items_of(ds.item_ids, de & (ds.item_category == target_cat), 3)
    rt.TrackEvents(pb.TrackEventsRequest(events=[ev(E.VIEW, i, session="s-fresh") for i in seen]))
    after = rt.Recommend(pb.RecommendRequest(context=ctx, num_results=20))
    assert after.personalized
    assert [i.item_id for i in after.items] != [i.item_id for i in before.items]
    # The new list sits closer to what was just viewed.
    artifact = load_artifact(trained.artifacts)
    emb = np.asarray(artifact["item_embeddings"])
    row = {str(i): r for r, i in enumerate(artifact["item_ids"])}
    viewed = emb[[row[i] for i in seen]].mean(axis=0)
    viewed /= np.linalg.norm(viewed)

    def closeness(reply: pb.RecommendResponse) -> float:
        vecs = emb[[row[i.item_id] for i in reply.items]]
        return float((vecs @ viewed / np.linalg.norm(vecs, axis=1)).mean())

    assert closeness(after) > closeness(before) + 0.05


def test_purchased_items_are_not_recommended(
    rt: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ctx = pb.RequestContext(session_id="s-buyer", country="DE", device=Device.MOBILE)
    rt.TrackEvents(
        pb.TrackEventsRequest(
            events=[ev(E.VIEW, str(trained.dataset.item_ids[5]), session="s-buyer")]
        )
    )
    first = rt.Recommend(pb.RecommendRequest(context=ctx, num_results=5))
    bought = first.items[0].item_id
    rt.TrackEvents(
        pb.TrackEventsRequest(
            events=[ev(E.PURCHASE, bought, session="s-buyer", price=10, quantity=1)]
        )
    )
    again = rt.Recommend(pb.RecommendRequest(context=ctx, num_results=50))
    assert bought not in {i.item_id for i in again.items}


def test_cart_page_never_shows_cart_items(
    rt: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ds = trained.dataset
    de = ds.item_countries[:, ds.country_codes.index("DE")] & ds.item_in_stock
    cart = items_of(ds.item_ids, de, 3)
    rt.TrackEvents(
        pb.TrackEventsRequest(events=[ev(E.ADD_TO_CART, i, session="s-cart") for i in cart])
    )
    ctx = pb.RequestContext(
        session_id="s-cart", country="DE", device=Device.MOBILE, placement=pb.RequestContext.CART
    )
    reply = rt.Recommend(pb.RecommendRequest(context=ctx, num_results=100))
    assert len(reply.items) == 100
    assert not {i.item_id for i in reply.items} & set(cart)


def test_popular_follows_live_events(rt: pb_grpc.RecommenderStub, trained: TrainedStore) -> None:
    ds = trained.dataset
    jp = ds.country_codes.index("JP") if "JP" in ds.country_codes else 0
    country = ds.country_codes[jp]
    mask = ds.item_countries[:, jp] & ds.item_in_stock
    hot = items_of(ds.item_ids, mask, 200)[-1]  # an item the trained bestsellers do not lead with
    burst = [
        pb.Event(
            type=E.PURCHASE,
            item_id=hot,
            price=1,
            context=pb.RequestContext(
                session_id=f"s-pop-{i}", country=country, device=Device.TABLET
            ),
        )
        for i in range(30)
    ]
    rt.TrackEvents(pb.TrackEventsRequest(events=burst))
    ctx = pb.RequestContext(country=country, device=Device.TABLET)
    best = rt.Popular(pb.PopularRequest(context=ctx, num_results=10))
    assert best.items[0].item_id == hot
    assert best.items[0].provenance == Prov.SEGMENT_POPULARITY
    assert best.segment.startswith(country)
    trending = rt.Popular(
        pb.PopularRequest(context=ctx, num_results=10, kind=pb.PopularRequest.TRENDING)
    )
    assert trending.items[0].item_id == hot and trending.items[0].provenance == Prov.TRENDING
    cold = rt.Recommend(
        pb.RecommendRequest(
            context=pb.RequestContext(session_id="s-new-jp", country=country, device=Device.TABLET)
        )
    )
    assert cold.items[0].item_id == hot


def test_stream_events(rt: pb_grpc.RecommenderStub, trained: TrainedStore) -> None:
    item = str(trained.dataset.item_ids[1])
    batches = [
        pb.StreamEventsRequest(
            events=[ev(E.VIEW, item, session=f"s-stream-{b}-{i}") for i in range(50)]
        )
        for b in range(4)
    ]
    batches.append(pb.StreamEventsRequest(events=[ev(E.VIEW, "ghost", session="s-stream")]))
    reply = rt.StreamEvents(iter(batches))
    assert reply.accepted == 200
    assert reply.rejected_count == 1 and reply.rejected[0].index == 200


def test_upserted_item_is_searchable_and_attribute_changes_apply(
    rt: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ds = trained.dataset
    category = ds.category_names[int(ds.item_category[0])]
    new = pb.CatalogItem(
        item_id="new-1",
        category=category,
        brand="FreshBrand",
        price=12.5,
        currency="EUR",
        countries=["DE", "FR"],
    )
    reply = rt.UpsertItems(
        pb.UpsertItemsRequest(
            items=[new, pb.CatalogItem(item_id="bad", category="no/such", price=1)]
        )
    )
    assert (reply.created, reply.updated) == (1, 0)
    assert reply.rejected[0].index == 1 and reply.rejected[0].field == "items[1].category"
    ctx = pb.RequestContext(country="DE", currency="EUR")
    only_new = pb.Filters(brands=["FreshBrand"])
    found = rt.Recommend(pb.RecommendRequest(context=ctx, filters=only_new))
    assert [i.item_id for i in found.items] == ["new-1"]
    assert found.items[0].price == pytest.approx(12.5)
    similar = rt.SimilarItems(pb.SimilarItemsRequest(seed_item_ids=["new-1"], num_results=5))
    assert len(similar.items) == 5
    # Price, stock and availability changes apply to the very next request.
    rt.UpsertItems(
        pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id="new-1", price=99.0, currency="EUR")])
    )
    assert not rt.Recommend(
        pb.RecommendRequest(context=ctx, filters=pb.Filters(brands=["FreshBrand"], max_price=50))
    ).items
    rt.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id="new-1", in_stock=False)]))
    assert not rt.Recommend(pb.RecommendRequest(context=ctx, filters=only_new)).items
    rt.UpsertItems(
        pb.UpsertItemsRequest(
            items=[pb.CatalogItem(item_id="new-1", in_stock=True, countries=["FR"])]
        )
    )
    assert not rt.Recommend(pb.RecommendRequest(context=ctx, filters=only_new)).items
    fr = rt.Recommend(
        pb.RecommendRequest(context=pb.RequestContext(country="FR"), filters=only_new)
    )
    assert [i.item_id for i in fr.items] == ["new-1"]


def test_merchandising_tags_from_training_and_upserts_steer_boosts(
    rt: pb_grpc.RecommenderStub, trained: TrainedStore
) -> None:
    ds = trained.dataset
    assert ds.item_tags is not None
    bit = ds.tag_names.index("high_margin")
    high = {str(i) for i, w in zip(ds.item_ids, ds.item_tags, strict=True) if int(w) >> bit & 1}
    ctx = pb.RequestContext(user_id=str(ds.user_ids[5]), country="DE")

    def recommend(tag: str, factor: float, **kw: object) -> list[str]:
        boost = pb.Rules.Boost(attribute="tag", value=tag, factor=factor)
        req = pb.RecommendRequest(context=ctx, num_results=20, rules=pb.Rules(boosts=[boost]), **kw)  # type: ignore[arg-type]
        return [i.item_id for i in rt.Recommend(req).items]

    plain, hidden, boosted = (recommend("high_margin", f) for f in (1.0, 0.0, 5.0))
    assert len(hidden) == 20 and not set(hidden) & high
    assert len(set(boosted) & high) > len(set(plain) & high)
    # A tag no item has changes nothing.
    assert recommend("no-such-tag", 0.0) == plain
    # Tags arrive with UpsertItems: set, kept when unset, replaced (or cleared) when set.
    category = ds.category_names[int(ds.item_category[0])]
    promo = pb.CatalogItem.Tags(values=["promo-week"])
    item = pb.CatalogItem(
        item_id="tagged-1", category=category, brand="TagBrand", price=5.0, countries=["DE"]
    )
    item.tags.CopyFrom(promo)
    assert rt.UpsertItems(pb.UpsertItemsRequest(items=[item])).created == 1
    only = pb.Filters(brands=["TagBrand"])
    assert recommend("promo-week", 1.0, filters=only) == ["tagged-1"]
    assert recommend("promo-week", 0.0, filters=only) == []
    rt.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id="tagged-1", price=6.0)]))
    assert recommend("promo-week", 0.0, filters=only) == []
    cleared = pb.CatalogItem(item_id="tagged-1", tags=pb.CatalogItem.Tags())
    rt.UpsertItems(pb.UpsertItemsRequest(items=[cleared]))
    assert recommend("promo-week", 0.0, filters=only) == ["tagged-1"]
    # Bad tags: named fields; a catalog holds at most 64 distinct tags.
    with pytest.raises(grpc.RpcError) as err:
        many = pb.CatalogItem.Tags(values=[f"t{j}" for j in range(17)])
        rt.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id="x", tags=many)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("items[0].tags.values:")
    with pytest.raises(grpc.RpcError) as err:
        blank = pb.CatalogItem.Tags(values=["ok", ""])
        rt.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id="x", tags=blank)]))
    assert (err.value.details() or "").startswith("items[0].tags.values[1]:")
    rejected = []
    for batch in range(4):  # 3 known + 3 x 16 new = 51 fit; 16 more do not
        tags = pb.CatalogItem.Tags(values=[f"b{batch}-{j}" for j in range(16)])
        reply = rt.UpsertItems(
            pb.UpsertItemsRequest(items=[pb.CatalogItem(item_id="tagged-1", tags=tags)])
        )
        rejected += [(batch, r.field) for r in reply.rejected]
    assert rejected == [(3, "items[0].tags")]


def test_delete_items(rt: pb_grpc.RecommenderStub, trained: TrainedStore) -> None:
    victim = str(trained.dataset.item_ids[2])
    reply = rt.DeleteItems(pb.DeleteItemsRequest(item_ids=[victim, "never-existed"]))
    assert reply.deleted == 1 and list(reply.unknown_item_ids) == ["never-existed"]
    rerank = rt.Rerank(pb.RerankRequest(candidate_item_ids=[victim]))
    assert list(rerank.unknown_item_ids) == [victim]
    with pytest.raises(grpc.RpcError) as err:
        rt.SimilarItems(pb.SimilarItemsRequest(seed_item_ids=[victim]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_forget_user(
    rt: pb_grpc.RecommenderStub, live: ServerThread, trained: TrainedStore
) -> None:
    user = str(trained.dataset.user_ids[3])
    item = str(trained.dataset.item_ids[7])
    rt.TrackEvents(
        pb.TrackEventsRequest(
            events=[ev(E.VIEW, item, user=user), ev(E.ADD_TO_CART, item, user=user)]
        )
    )
    assert rt.Recommend(pb.RecommendRequest(context=pb.RequestContext(user_id=user))).personalized
    reply = rt.ForgetUser(pb.ForgetUserRequest(user_id=user))
    assert reply.state_entries_removed >= 2
    assert reply.events_tombstoned == 2
    assert reply.trained_profile_suppressed
    after = rt.Recommend(pb.RecommendRequest(context=pb.RequestContext(user_id=user)))
    assert not after.personalized
    assert not rt.RecentlyViewed(
        pb.RecentlyViewedRequest(context=pb.RequestContext(user_id=user))
    ).items
    records, stats = read_events(Path(live.settings.event_log))
    assert not any(r.event.context.user_id == user for r in records)
    assert stats.dead_events == 2
    with pytest.raises(grpc.RpcError) as err:
        rt.ForgetUser(pb.ForgetUserRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reload_keeps_live_changes_and_refuses_bad_versions(
    rt: pb_grpc.RecommenderStub, live: ServerThread
) -> None:
    engine = live.running.holder.current
    assert engine is not None
    rt.UpsertItems(
        pb.UpsertItemsRequest(
            items=[
                pb.CatalogItem(
                    item_id="survives-reload",
                    category=engine.catalog.category_names[0],
                    price=5,
                    countries=["DE"],
                )
            ]
        )
    )
    version = rt.Recommend(pb.RecommendRequest()).model_version
    reply = rt.ReloadModel(pb.ReloadModelRequest())
    assert reply.model_version == version and reply.previous_model_version == version
    assert rt.SimilarItems(
        pb.SimilarItemsRequest(seed_item_ids=["survives-reload"], num_results=3)
    ).items
    with pytest.raises(grpc.RpcError) as err:
        rt.ReloadModel(pb.ReloadModelRequest(version="no-such-version"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        rt.ReloadModel(pb.ReloadModelRequest(version="../etc"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rt.Recommend(pb.RecommendRequest()).model_version == version


def test_query_vector_weighs_the_session_over_the_trained_history(
    trained: TrainedStore,
) -> None:
    """q = user + P @ weighted mean(history) + device + country (server/artifact.py):
    trained items weigh 1, a session item 1 + session_boost * 2^(-age / half-life)."""
    engine = Engine(load_artifact(trained.artifacts))
    a = engine.artifact
    user = str(a["user_ids"][5])
    lo, hi = a["user_history_indptr"][5], a["user_history_indptr"][6]
    history = a["user_history_items"][max(lo, hi - engine.history_length) : hi]
    ctx = Context(user_id=user, country="DE", device=int(Device.MOBILE))
    base = (
        a["context_device"][int(Device.MOBILE)]
        + a["context_country"][engine.country_row("DE")]
        + a["user_embeddings"][5]
    )
    emb, proj, blend = a["item_embeddings"], a["history_projection"], engine.blend

    q, personal = engine.encode(ctx, Profile(), 100.0)
    assert personal and hi > lo
    np.testing.assert_allclose(q, base + proj @ emb[history].mean(axis=0), atol=1e-5)

    # Two session items, seen 0 s and one half-life ago (newest first), one unknown id.
    ids = [str(i) for i in a["item_ids"][[7, 9]]]
    half = blend.session_half_life_s
    recent = ((ids[0], 100.0), ("no-such-item", 100.0), (ids[1], 100.0 - half))
    weights = np.concatenate([np.ones(len(history)), 1 + blend.session_boost * np.array([1, 0.5])])
    rows = np.concatenate([history, [7, 9]])
    want = base + proj @ (weights @ emb[rows] / weights.sum())
    q, personal = engine.encode(ctx, Profile(recent=recent), 100.0)
    np.testing.assert_allclose(q, want, atol=1e-5)

    # A shopper known only by the session: personal; nothing known: context only.
    anon = Context(session_id="s", country="DE", device=int(Device.MOBILE))
    q, personal = engine.encode(anon, Profile(recent=recent[:1]), 100.0)
    assert personal
    np.testing.assert_allclose(q, base - a["user_embeddings"][5] + proj @ emb[7], atol=1e-5)
    q, personal = engine.encode(anon, Profile(), 100.0)
    assert not personal
    np.testing.assert_allclose(q, base - a["user_embeddings"][5], atol=1e-6)
