"""HTTP layer: request/response schemas, dependencies, middleware and the routes (one module per area)."""
