"""Process groups (`parallel`), the CPU compatibility shims (`cpu_compat`), local multi-rank spawning (`spawn`)
and the installation smoke test (`smoke`)."""
