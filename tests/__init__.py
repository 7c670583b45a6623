"""sd-train's tests: tests/unit (in-process), tests/e2e (real processes), tests/support (helpers)."""
