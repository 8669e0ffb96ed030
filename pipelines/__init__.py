"""Ready-to-run recipes and the bundled default data (installed as `rlkd_pipelines`)."""
