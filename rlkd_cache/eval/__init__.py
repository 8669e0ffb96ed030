"""Evaluation of distilled students: alignment metrics against a cached teacher, ROUGE-L."""
