"""`qconv serve`: the OpenAI-compatible API, its request schema, the continuous-batching scheduler, the page."""
