"""The mmsmall eval suite: chart, document, counting and pointing benchmarks with standard metrics.

- ``eval.runner.evaluate(model, tasks, out, ...)``: run benchmarks, cache predictions, score, report
- ``eval.metrics``: per-sample scores equal to lmms-eval 0.7.3's (ChartQA, ANLS, TextVQA, AI2D,
  OCRBench, counting) and pointing precision/recall/F1
- ``eval.tasks``: one file per benchmark, registered in ``eval.tasks.TASKS``
- ``eval.report``: results.json / markdown table / comparison bar chart
- command line: ``python -m eval --model PATH --tasks chartqa,docvqa --data chartqa=/data/ChartQA --out DIR``
"""
