"""The contender apps the benchmark runs next to the project's own app."""
