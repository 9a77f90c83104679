"""Benchmarks behind `edge bench pipeline|serve|adapt|serial|mqtt|learning` (figures go to BENCHMARKS.md)."""
