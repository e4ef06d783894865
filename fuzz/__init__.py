"""Coverage-guided fuzzing (atheris) of everything that parses peer bytes or user files.

`python -m fuzz TARGET [libFuzzer options]` runs one target; `python -m fuzz.run_all` runs every
target for a bounded time and prints executions per second (what `make fuzz` does).  The
contracts live in `fuzz.contracts` and need no atheris (the regression tests use them).
"""
