# The prediction service: gunicorn serving the Flask app on :8080, as a non-root user.
#
#   docker build -t prediction-service .                               # CPU-only torch (default)
#   docker build --build-arg TORCH_VARIANT=cu130 -t prediction-service:cuda .   # CUDA 13.0 torch
#
# It runs behind nginx (deploy/nginx.conf): docker-compose.yml and the Kubernetes pods
# (deploy/k8s/) put it there. Never publish its port: one client sending slowly holds a sync
# worker, a few hold them all; nginx reads whole requests first. Nothing is EXPOSEd, so
# `docker run -P` publishes nothing either.
#
# TORCH_VARIANT names a wheel index of download.pytorch.org/whl/ (cpu, cu126, cu128, cu130...);
# the versions are the pins of requirements.txt. The CUDA variant also needs USE_CUDA=1 and
# `docker run --gpus all`.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt .
# torch and torchvision first, from PyTorch's index for the chosen variant (PyPI's Linux wheels
# pull in gigabytes of CUDA libraries); the rest then finds them already installed.
RUN grep -E '^(torch|torchvision)==' requirements.txt > torch-requirements.txt \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r torch-requirements.txt \
    && pip install --no-cache-dir -r requirements.txt \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080 \
    MODELS_DIR=/app/models
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY wsgi.py ./
COPY config/ config/
COPY service/ service/
RUN mkdir -p /app/models && chown app:app /app/models
# Model files are mounted or fetched here (PRED_MODEL_PATH or PRED_MODEL_URI); never baked in.
VOLUME ["/app/models"]
USER 10001:10001
# python-slim has no curl; urlopen raises, and python exits 1, on anything but a 2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('PORT', '8080'), timeout=4)"]
CMD ["gunicorn", "-c", "config/gunicorn.conf.py", "wsgi:app"]
