"""The cache's graph analysis: residual sublayers and chains (`regions`), the segments a call runs
(`segments`), and the whole-call graphs of uniform calls (`step_graphs`)."""
