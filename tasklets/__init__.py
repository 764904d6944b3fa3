"""Task processes (one per task: spec, extension, pipeline, client endpoint), the client library
and the `fmplex` CLI. Nothing here imports torch: a standard task process stays lean."""
