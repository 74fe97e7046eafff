"""The API's routes, one `APIRouter` module per area; daemon.http.app includes them in order.

Handlers are thin: parse, call the service, shape the answer (daemon.http.answers). They get the
service (and the usage history) as FastAPI dependencies from the app's state, set once by
`create_app`; the dependencies are coroutines, so no request pays a trip to a worker thread.
Handler names are the OpenAPI document's operation ids: renaming one changes the document.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from daemon.service import Service
from daemon.store.history import History
from daemon.store.reported import Reported


async def service_of(request: Request) -> Service:
    """The service the app was created for."""
    service: Service = request.app.state.service
    return service


async def history_of(request: Request) -> History:
    """The usage history; the usage routes exist only when the service has one."""
    history: History = request.app.state.history
    return history


async def reported_of(request: Request) -> Reported:
    """Other servers' usage: the fleet database when one is set, else the history."""
    reported: Reported = request.app.state.reported
    return reported


ServiceDep = Annotated[Service, Depends(service_of)]
ReportedDep = Annotated[Reported, Depends(reported_of)]
HistoryDep = Annotated[History, Depends(history_of)]
