"""Benchmarks behind `edge bench pipeline|serve|adapt|serial|mqtt` (figures go to BENCHMARKS.md)."""
