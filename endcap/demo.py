"""`endcap demo`: serve the trained artifact and show what contrasting shoppers get."""

from __future__ import annotations

import asyncio
import signal

import grpc
from prometheus_client import start_http_server
from rich.console import Console
from rich.table import Table

from endcap.ui import console as make_console
from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.app import load_engine, start
from server.infra.settings import Settings

Device = pb.RequestContext.Device
Placement = pb.RequestContext.Placement
_PROVENANCE = pb.RecommendedItem.Provenance


def _table(title: str, items: list[pb.RecommendedItem]) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in (
        "#",
        "item",
        "category",
        "brand",
        "price",
        "stock",
        "score",
        "provenance",
        "reason",
    ):
        table.add_column(col, justify="right" if col in {"#", "price", "score"} else "left")
    for rank, it in enumerate(items, 1):
        table.add_row(
            str(rank),
            it.item_id,
            it.category,
            it.brand,
            f"{it.price:,.2f} {it.currency}",
            "yes" if it.in_stock else "no",
            f"{it.score:.3f}",
            _PROVENANCE.Name(it.provenance).lower(),
            it.reason,
        )
    return table


async def show_examples(
    stub: pb_grpc.RecommenderAsyncStub, user_ids: list[str], console: Console
) -> None:
    """Call the running server like a shop backend would and print the answers."""
    shopper_a, shopper_b = user_ids[0], user_ids[min(1, len(user_ids) - 1)]
    a = await stub.Recommend(
        pb.RecommendRequest(
            context=pb.RequestContext(
                user_id=shopper_a,
                device=Device.MOBILE,
                country="DE",
                currency="EUR",
                placement=Placement.HOME,
            ),
            filters=pb.Filters(max_price=50.0),
            num_results=8,
        )
    )
    console.print(
        _table(f"Recommend: shopper {shopper_a}, mobile, DE, budget ≤ €50", list(a.items))
    )
    b = await stub.Recommend(
        pb.RecommendRequest(
            context=pb.RequestContext(
                user_id=shopper_b,
                device=Device.DESKTOP,
                country="US",
                currency="USD",
                placement=Placement.HOME,
                traffic_source="email",
            ),
            num_results=8,
        )
    )
    segment = pb.ShopperSegment.Name(b.shopper_segment)
    title = f"Recommend: shopper {shopper_b}, desktop, US, via {b.traffic_source}, {segment}"
    console.print(_table(title, list(b.items)))
    new = await stub.Recommend(
        pb.RecommendRequest(
            context=pb.RequestContext(
                session_id="demo-new-visitor", device=Device.MOBILE, country="GB", currency="GBP"
            ),
            num_results=5,
        )
    )
    console.print(_table("Recommend: brand-new visitor, mobile, GB (cold start)", list(new.items)))
    if a.items:
        seed = a.items[0]
        similar = await stub.SimilarItems(
            pb.SimilarItemsRequest(
                seed_item_ids=[seed.item_id],
                context=pb.RequestContext(
                    country="DE", currency="EUR", placement=Placement.PRODUCT
                ),
                num_results=5,
            )
        )
        console.print(
            _table(
                f"SimilarItems: product page of {seed.item_id} ({seed.category}), DE",
                list(similar.items),
            )
        )
        upsell = await stub.Recommend(
            pb.RecommendRequest(
                context=pb.RequestContext(
                    country="DE", currency="EUR", placement=Placement.PRODUCT
                ),
                seed_item_ids=[seed.item_id],
                strategy="product.upsell",
                num_results=3,
            )
        )
        console.print(
            _table(
                f"Recommend, strategy product.upsell: same category, 1.1-2x the price of "
                f"{seed.item_id} ({seed.price:,.2f} EUR)",
                list(upsell.items),
            )
        )
        cart_ctx = pb.RequestContext(
            session_id="demo-cart", country="DE", currency="EUR", placement=Placement.CART
        )
        await stub.TrackEvents(
            pb.TrackEventsRequest(
                events=[pb.Event(type=pb.Event.ADD_TO_CART, item_id=seed.item_id, context=cart_ctx)]
            )
        )
        cart = await stub.Recommend(pb.RecommendRequest(context=cart_ctx, num_results=5))
        console.print(
            _table(
                f"Recommend, cart page after TrackEvents(ADD_TO_CART {seed.item_id}): "
                f"cross-sell, never the cart item (segment {pb.ShopperSegment.Name(cart.shopper_segment)})",
                list(cart.items),
            )
        )
    candidates = [it.item_id for it in b.items] + ["not-a-real-item"]
    reranked = await stub.Rerank(
        pb.RerankRequest(
            candidate_item_ids=candidates,
            context=pb.RequestContext(
                user_id=shopper_a, device=Device.MOBILE, country="DE", currency="EUR"
            ),
        )
    )
    console.print(
        _table(
            f"Rerank: shopper {shopper_b}'s list for shopper {shopper_a} in DE "
            f"(unknown: {list(reranked.unknown_item_ids)}, filtered out: {len(reranked.filtered_item_ids)})",
            list(reranked.items),
        )
    )
    console.print(f"model_version={a.model_version} recommendation_id={a.recommendation_id}")


async def run_demo(settings: Settings, *, keep_serving: bool) -> int:
    console = make_console()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
    running = await start(settings)
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(running.executor, load_engine, settings)
    running.publish(engine)
    await running.set_serving(True)
    target = f"{settings.host}:{running.port}"
    console.print(
        f"[bold]endcap[/bold] serving model {engine.model_version} "
        f"({len(engine.catalog):,} items) on {target}"
    )
    users = engine.artifact["user_ids"][:2].tolist()
    async with grpc.aio.insecure_channel(target) as channel:
        await show_examples(pb_grpc.RecommenderStub(channel), users, console)
    console.print("\nTry it yourself:")
    console.print(f"  grpcurl -plaintext {target} list")
    console.print(
        f'  grpcurl -plaintext -d \'{{"context": {{"user_id": "{users[0]}", "country": "DE", '
        f'"currency": "EUR", "device": "MOBILE"}}, "filters": {{"max_price": 50}}, '
        f'"num_results": 5}}\' {target} endcap.v1.Recommender/Recommend'
    )
    if settings.metrics_port:
        console.print(
            f"  curl -s http://{settings.host}:{settings.metrics_port}/metrics | grep endcap_"
        )
    if keep_serving:
        console.print("\nServing until Ctrl-C.")
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    await running.stop(settings.grace_s if keep_serving else 0)
    return 0
