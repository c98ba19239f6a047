"""The FastAPI server: OpenAI routes, metrics, errors."""
