"""Offline reports: labelled-face accuracy, run label flicker, speed benchmarks, people report."""
