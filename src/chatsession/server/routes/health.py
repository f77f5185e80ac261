"""``/healthz`` (the process answers), ``/readyz`` (the store answers), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from chatsession.errors import SessionNotFoundError, StoreError
from chatsession.server.auth import Context
from chatsession.server.keys import KEYS_SESSION
from chatsession.server.metrics import CONTENT_TYPE_LATEST

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "the store cannot be reached"}})
async def readyz(context: Context) -> Response:
    """200 when the store answers, else 503."""
    try:
        await context.manager.store.get(KEYS_SESSION)
    except SessionNotFoundError:
        pass  # it answered
    except StoreError:
        return JSONResponse(
            {"status": "unavailable", "store": "the store cannot be reached"},
            status_code=503,
            headers={"Retry-After": "1"},
        )
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response)
async def metrics(context: Context) -> Response:
    """The Prometheus metrics of this worker (text format)."""
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)
