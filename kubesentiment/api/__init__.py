"""The HTTP edge: what a request passes before and after `Sentiment` sees it (request ids, body
size, API keys, rate limits, the error contract), the request and response bodies, and the
corrections to the published OpenAPI document."""
