"""The API routes, one router per area (see docs/API.md).

Routers are matched in list order on every request: the hot endpoints (recommend, embed) come first, which saves
~25 us of routing per request (bench/serve.py). /docs keeps its own order (``TAGS``).
"""

from service.api.routes import admin, embeddings, health, items, recommend, tables

ROUTERS = [recommend.router, embeddings.router, health.router, items.router, tables.router, admin.router]

# The order of the sections at /docs.
TAGS = [{"name": n} for n in ("service", "embeddings", "items", "tables", "recommend")]
