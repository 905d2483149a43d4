"""A deterministic synthetic benchmark: seven small suites (multiple-choice arithmetic, reading
comprehension, logic, general knowledge, sorting, JSON output, copying) whose examples are pure
functions of (suite, seed, index), rule-based scorers that tolerate common reply surface forms
(`scoring`), and a uniform-random baseline that gives each suite its chance-level accuracy.
Standard library only; no MLX and no Prefect import.
"""
