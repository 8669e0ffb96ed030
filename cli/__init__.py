"""The `rlkd` command line (installed as the `rlkd_cli` package)."""
