"""What every stage shares: params, paths, atomic writes, metrics, tracking, threads, the stage contract."""
