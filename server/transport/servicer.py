"""The Recommender servicer: validate, call the engine, render; errors mapped in one place."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from endcap.v1 import recommender_pb2 as pb
from endcap.v1 import recommender_pb2_grpc as pb_grpc
from server.domain.engine import Answer, Engine
from server.domain.errors import InvalidQuery, UnknownItems
from server.infra.metrics import Metrics
from server.transport import validate
from server.transport.validate import InvalidRequest

log = logging.getLogger(__name__)

Q = TypeVar("Q")


class EngineHolder:
    """The engine currently served; swapped whole on reload, None until one loads."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.current = engine


def _status(code: int, message: str, field: str | None = None) -> grpc.Status:
    status = status_pb2.Status(code=code, message=message)
    if field is not None:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, holder: EngineHolder, metrics: Metrics) -> None:
        self._holder = holder
        self._metrics = metrics

    async def _serve(
        self,
        context: grpc.aio.ServicerContext[object, object],
        parse: Callable[[], Q],
        run: Callable[[Engine, Q], Answer],
    ) -> tuple[Engine, Answer]:
        """Validate, run on the current engine, map every error to one status."""
        engine = self._holder.current
        try:
            query = parse()
            if engine is None:
                raise _Unavailable
            start = time.perf_counter()
            answer = run(engine, query)
            self._metrics.retrieval.labels(answer.results.plan).observe(time.perf_counter() - start)
        except (InvalidRequest, InvalidQuery) as exc:
            await context.abort_with_status(_status(code_pb2.INVALID_ARGUMENT, str(exc), exc.field))
        except UnknownItems as exc:
            await context.abort_with_status(_status(code_pb2.NOT_FOUND, str(exc), exc.field))
        except _Unavailable:
            await context.abort_with_status(
                _status(code_pb2.UNAVAILABLE, "no model loaded yet; retry shortly")
            )
        assert engine is not None
        return engine, answer

    def _items(self, engine: Engine, answer: Answer, out: list[pb.RecommendedItem]) -> None:
        cat = engine.catalog
        res = answer.results
        ids = res.ids
        for item_id, score, price, category, brand, stock, prov in zip(
            cat.item_ids[ids].tolist(),
            res.scores.tolist(),
            (cat.price[ids] * answer.rate).tolist(),
            cat.category[ids].tolist(),
            cat.brand[ids].tolist(),
            cat.in_stock[ids].tolist(),
            res.provenance.tolist(),
            strict=True,
        ):
            out.append(
                pb.RecommendedItem(
                    item_id=item_id,
                    score=score,
                    price=price,
                    currency=answer.currency,
                    category=cat.category_names[category],
                    brand=cat.brand_names[brand],
                    in_stock=stock,
                    provenance=prov,
                )
            )
        counts: dict[int, int] = {}
        for prov in res.provenance.tolist():
            counts[prov] = counts.get(prov, 0) + 1
        for prov, n in counts.items():
            self._metrics.items_served.labels(_PROVENANCE_LABELS[prov]).inc(n)

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RecommendResponse:
        engine, answer = await self._serve(
            context, lambda: validate.recommend(request), Engine.recommend
        )
        items: list[pb.RecommendedItem] = []
        self._items(engine, answer, items)
        return pb.RecommendResponse(
            items=items,
            recommendation_id=uuid.uuid4().hex,
            model_version=engine.model_version,
            currency=answer.currency,
            personalized=answer.personalized,
        )

    async def Rerank(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RerankResponse:
        engine, answer = await self._serve(context, lambda: validate.rerank(request), Engine.rerank)
        items: list[pb.RecommendedItem] = []
        self._items(engine, answer, items)
        return pb.RerankResponse(
            items=items,
            unknown_item_ids=answer.unknown_ids,
            filtered_item_ids=answer.filtered_ids,
            recommendation_id=uuid.uuid4().hex,
            model_version=engine.model_version,
            currency=answer.currency,
            personalized=answer.personalized,
        )

    async def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.SimilarItemsResponse:
        engine, answer = await self._serve(
            context, lambda: validate.similar(request), Engine.similar
        )
        items: list[pb.RecommendedItem] = []
        self._items(engine, answer, items)
        return pb.SimilarItemsResponse(
            items=items,
            recommendation_id=uuid.uuid4().hex,
            model_version=engine.model_version,
            currency=answer.currency,
        )


class _Unavailable(Exception):
    pass


_PROVENANCE_LABELS = {
    v.number: v.name.lower()
    for v in pb.RecommendedItem.DESCRIPTOR.enum_types_by_name["Provenance"].values
}
