"""FastAPI dependencies: the service and its engine from `app.state`, 503 until ready."""

from typing import Annotated

from fastapi import Depends, Request

from app.api.errors import APIError
from app.engine.engine import Engine
from app.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_engine(service: ServiceDep) -> Engine:
    if service.draining:
        raise APIError(503, "the server is shutting down", "unavailable")
    engine = service.engine
    if engine is None or not engine.alive:
        if service.error:
            reason = service.error
        elif engine is not None and engine.error is not None:
            reason = f"the engine failed ({engine.error}); the server needs a restart"
        else:
            reason = "the model is still loading"
        raise APIError(503, f"not ready: {reason}", "unavailable")
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
