"""Benchmarks behind `edge bench pipeline|serve|adapt|serial|learning` (figures go to BENCHMARKS.md)."""
