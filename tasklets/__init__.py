"""The task process: one per task (spec, extension, pipeline, client endpoint, daemon link), and the
task zygote that forks them. Nothing here imports torch: a standard task process stays lean."""
