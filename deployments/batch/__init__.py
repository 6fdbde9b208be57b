"""OpenAI's Batch API: files and batches in a durable store (``store``), run by one Serve
deployment next to interactive traffic (``runner``), and a command line for pipeline authors
(``python -m deployments.batch``)."""
