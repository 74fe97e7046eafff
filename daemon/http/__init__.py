"""The HTTP side: the API app (app.py) with its routes, request schemas and answer shapes, the
ASGI layers around it (middleware/), the sockets it answers on (server.py), the page (page.py)
and the Prometheus metrics (metrics.py).

It calls the service only through the Service front's operations and read methods, never through
its owners. This package imports nothing itself, so the poll loop can import daemon.http.metrics
without loading the routes.
"""
