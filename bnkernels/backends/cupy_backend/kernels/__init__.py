"""CUDA C sources of the CuPy backend (package data; see README.md)."""
