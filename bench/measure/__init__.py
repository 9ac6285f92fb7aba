"""Measurement: timing, memory, hardware profiles, provenance and result checks.

The layer below `tasks/`: a task measures through these modules, and nothing
here knows which task or method it is measuring.
"""
