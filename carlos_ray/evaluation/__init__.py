"""Does it find the right LoRA? The paper's evaluation, run where the truth is known.

- `metrics`: P@k, MRR, nDCG@k against graded relevance from planted behaviours;
- `queries`: the query file (positive queries with ground truth, negative queries);
- `retrievers`: CARLoS and its ablations through the service's code, and metadata baselines;
- `judging`: held-out generation on Ray Data through the indexing actor pools, judged by a pixel
  oracle and by the encoder;
- `run`: everything together into one table; `report`: the HTML page and chart.
"""
