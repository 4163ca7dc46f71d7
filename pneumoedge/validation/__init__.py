"""Local validation on the runtime side (no TensorFlow): metrics with intervals, and the clinic's report.

`metrics` holds the numbers (numpy only); kept import-light so that `pneumoedge.thresholds`
and the export side can use it without pulling in the report.
"""
