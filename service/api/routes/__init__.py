"""The API routes, one router per area (see docs/API.md)."""

from service.api.routes import admin, embeddings, health, items, recommend, tables

ROUTERS = [health.router, embeddings.router, items.router, tables.router, recommend.router, admin.router]
