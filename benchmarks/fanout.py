#!/usr/bin/env python3
"""Tidings fan-out benchmark; same options as `tidings bench` (see benchmarks/README.md)."""

from tidings.bench import main

if __name__ == "__main__":
    main(prog_name="benchmarks/fanout.py")
