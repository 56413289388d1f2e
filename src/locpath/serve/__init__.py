"""`locpath serve`: the HTTP service scanner software and hospital systems call (FastAPI + uvicorn): slides registered
by path, upload or DICOMweb and ingested as background jobs, questions answered as JSON or server-sent events, an
OpenAI-compatible chat endpoint, jobs in a database, API keys, Prometheus metrics and a web page."""
