"""``outlierd bench``: the speed and quality suites a user runs on their own machine.

Each suite (kernels, latency, server, quality, gpu) returns a plain dict that goes into
``results.json``; :mod:`.report` turns the results into plots (PNG), ``report.html`` and a text
table, and :mod:`.compare` gives the ratios between two reports. Every speed number has a peer
measured in the same run beside it (scikit-learn, ONNX Runtime, a bare gRPC echo server), because
only a same-run ratio survives a noisy machine.
"""
