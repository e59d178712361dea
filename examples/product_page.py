"""A shop backend rendering a product page with endcap: SimilarItems and Rerank, concurrently.

Run it against `endcap demo` (or `endcap serve`):

    python examples/product_page.py                      # picks a product for you
    python examples/product_page.py --item sku-0000042 --country DE --currency EUR

What a real backend would take from this:

- one `AsyncClient` per process, created at startup and shared by all requests;
- the shopper's context built once per page view and passed to every call;
- both widgets requested concurrently, each with a tight deadline, and a page
  that still renders (without the widget) when a call fails or is late;
- the `recommendation_id` of each widget kept for the impression and click
  events the page will send back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from endcap.client import AsyncClient, Context, EndcapError, Filters, Recommendations

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
) -> str:
    """The HTML-ish text of one product page for one shopper."""
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
    for widget in (similar, look):
        if widget.recs is None or not widget.recs.items:
            continue
        lines.append(f"--- {widget.title} ---")
        for item in widget.recs.items:
            lines.append(
                f"  {item.item_id:<14} {item.category:<34} {item.brand:<12} "
                f"{item.price:>9.2f} {item.currency}"
            )
        lines.append(f"  (recommendation_id={widget.recs.recommendation_id})")
        record_impressions(widget.recs, context)
    return "\n".join(lines)


def record_impressions(recs: Recommendations, context: Context) -> None:
    """Where the page reports what it showed.

    Send an impression event per shown item, and later a click event, each with
    `recs.recommendation_id`, so endcap can attribute clicks and conversions to
    the model version and experiment variant that produced them (TrackEvents,
    issue 6; this client gains `track_events` when the server ships it).
    """
    log.info(
        "impressions: recommendation_id=%s model=%s items=%s shopper=%s",
        recs.recommendation_id,
        recs.model_version,
        recs.item_ids,
        context.get("user_id") or context.get("session_id") or "anonymous",
    )


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
        print(await render_product_page(client, product, context))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
