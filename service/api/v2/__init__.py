"""The Open Inference Protocol (KServe V2, REST): health, metadata and inference under ``/v2``."""
