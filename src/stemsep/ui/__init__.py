"""`stemsep ui`: a local web page to separate songs and practise with their stems.

:mod:`~stemsep.ui.server` (the Starlette app and `serve`), :mod:`~stemsep.ui.security`
(Host, Origin and token checks), :mod:`~stemsep.ui.jobs` (the queue, one separation at a
time), :mod:`~stemsep.ui.engines` (this computer or Replicate), :mod:`~stemsep.ui.library`
(the output folder: one subfolder and record per separation) and ``static/`` (the page,
its stem mixer and the mixer's AudioWorklet, plain HTML, CSS and JavaScript).
"""
