"""Benchmarks behind `edge bench pipeline|serve|adapt|serial` (figures go to BENCHMARKS.md)."""
