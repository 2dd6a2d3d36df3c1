"""Online service: engine, batching, index, HTTP API. Imports models/, never training/."""
