"""Benchmarks behind ``v4lab bench NAME``. Each module has ``run(quick=False) -> list[dict]`` and
``main(argv) -> int``. Benchmarks report measured ratios side by side in one run; they are not tests."""
