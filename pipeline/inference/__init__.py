"""Inference on a user's own images and videos: `fakereasoning-predict`.

A thin layer over the evaluation (pipeline/evaluation): the same model loading
(any checkpoint `fakereasoning-eval` accepts), the same Scorer (protocols,
generation settings, one full forward per concluded image, the CPM's p(fake)),
with its own input side (files, folders, globs, lists, stdin; videos sampled
as the video benchmarks are), output formats, resumable journal, evidence maps
(the DINOv2 attention the fusion module consumed) and detect-only screening.
`cli.py` parses arguments, `run.py` runs, `data.py` decodes in loader workers,
`output.py` writes, `evidence.py` draws.
"""
