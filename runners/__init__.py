"""Model back ends: one shared tokenise / post-process path (engine) and the BentoML runner
services that wrap it with adaptive batching."""
