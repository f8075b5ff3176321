"""``python -m edged.bench``: the same command as ``edged bench``."""

from edged.bench.cli import bench_app

bench_app(prog_name="edged bench")
