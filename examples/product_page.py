"""A shop backend rendering a product page with endcap: SimilarItems and Rerank, concurrently.

Run it against `endcap demo` (or `endcap serve`):

    python examples/product_page.py                      # picks a product for you
    python examples/product_page.py --item sku-0000042 --country DE --currency EUR

What a real backend would take from this:

- one `AsyncClient` per process, created at startup and shared by all requests;
- the shopper's context built once per page view and passed to every call;
- both widgets requested concurrently, each with a tight deadline, and a page
  that still renders (without the widget) when a call fails or is late;
- an impression event per widget, carrying its `recommendation_id`, sent
  after the page is rendered (and a click event, with the same id, when the
  shopper clicks), so endcap can attribute clicks and purchases to the model
  and experiment variant that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from endcap.client import AsyncClient, Context, EndcapError, Event, Filters, Recommendations

log = logging.getLogger("product_page")

# A product page must not wait on recommendations: give up after 150 ms and
# render without the widget.
WIDGET_TIMEOUT_S = 0.15


@dataclass(frozen=True, slots=True)
class Widget:
    title: str
    recs: Recommendations | None  # None: the call failed, render nothing


async def _widget(title: str, call: asyncio.Future[Recommendations]) -> Widget:
    try:
        return Widget(title, await call)
    except EndcapError as exc:
        # Log and degrade: the page is still useful without recommendations.
        log.warning("%s unavailable: %s", title, exc)
        return Widget(title, None)


async def merchandised_list(client: AsyncClient, context: Context) -> list[str]:
    """Stand-in for your merchandising system's "complete the look" candidates.

    A real shop reads this list from its own database or search engine; this
    example borrows endcap's bestsellers so it runs against the demo store.
    """
    popular = await client.recommend(
        num_results=30, country=context.get("country", ""), currency=context.get("currency", "")
    )
    return popular.item_ids


async def render_product_page(
    client: AsyncClient, product_id: str, context: Context, cart: Sequence[str] = ()
) -> tuple[str, list[Widget]]:
    """The HTML-ish text of one product page for one shopper, and the widgets shown."""
    context = {**context, "placement": "product"}
    # Hard constraints for both widgets: shippable to the shopper, in stock,
    # nothing already in the cart, not the product itself.
    filters = Filters(in_stock_only=True, exclude_item_ids=[product_id, *cart])
    candidates = await merchandised_list(client, context)

    similar, look = await asyncio.gather(
        _widget(
            "You may also like",
            asyncio.ensure_future(
                client.similar_items(
                    product_id,
                    num_results=6,
                    filters=filters,
                    timeout_s=WIDGET_TIMEOUT_S,
                    **context,
                )
            ),
        ),
        _widget(
            "Complete the look",
            asyncio.ensure_future(
                client.rerank(
                    candidates,
                    num_results=4,
                    filters=filters,
                    timeout_s=WIDGET_TIMEOUT_S,
                    **context,
                )
            ),
        ),
    )
    lines = [f"=== Product {product_id} ==="]
    shown = []
    for widget in (similar, look):
        if widget.recs is None or not widget.recs.items:
            continue
        shown.append(widget)
        lines.append(f"--- {widget.title} ---")
        for item in widget.recs.items:
            lines.append(
                f"  {item.item_id:<14} {item.category:<34} {item.brand:<12} "
                f"{item.price:>9.2f} {item.currency}"
            )
        lines.append(f"  (recommendation_id={widget.recs.recommendation_id})")
    return "\n".join(lines), shown


async def send_impressions(client: AsyncClient, widgets: Sequence[Widget], context: Context) -> int:
    """Reports what the page showed: one impression event per widget.

    A click sends `Event("recommendation_click", context, item_id,
    recommendation_id=...)` the same way. Events are best effort: a failure is
    logged, never shown to the shopper.
    """
    events = [
        Event("recommendation_impression", context, recommendation_id=w.recs.recommendation_id)
        for w in widgets
        if w.recs is not None
    ]
    if not events:
        return 0
    try:
        tracked = await client.track_events(events, timeout_s=WIDGET_TIMEOUT_S)
    except EndcapError as exc:
        log.warning("impressions not recorded: %s", exc)
        return 0
    for rejection in tracked.rejected:
        log.warning("impression rejected: %s %s", rejection.field, rejection.reason)
    return tracked.accepted


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--target", default="localhost:50051", help="endcap host:port")
    parser.add_argument("--item", help="product id (default: a bestseller)")
    parser.add_argument("--user-id", default="", help="logged-in shopper id")
    parser.add_argument("--session-id", default="example-session", help="shop session id")
    parser.add_argument("--country", default="DE", help="ISO 3166-1 alpha-2")
    parser.add_argument("--currency", default="EUR", help="ISO 4217")
    parser.add_argument("--device", default="desktop", choices=["mobile", "tablet", "desktop"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    context = Context(
        user_id=args.user_id,
        session_id=args.session_id,
        country=args.country,
        currency=args.currency,
        device=args.device,
    )
    async with AsyncClient(args.target) as client:
        await client.wait_until_serving(timeout_s=10)
        product = args.item or (await merchandised_list(client, context))[0]
        page, shown = await render_product_page(client, product, context)
        print(page)
        sent = await send_impressions(client, shown, context)
        print(f"impressions recorded: {sent}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
