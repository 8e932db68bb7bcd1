"""Version 1 of the API, compatible with the FastAPI template's clients."""
