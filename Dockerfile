# A Surge worker. CPU by default; onnxruntime-gpu uses CUDA when the container is given a GPU.
FROM python:3.11-slim

WORKDIR /opt/surge
COPY pyproject.toml README.md ./
COPY cli cli
COPY config config
COPY schemas schemas
COPY producers producers
COPY workers workers
RUN pip install --no-cache-dir . && mkdir -p /models

ENV SURGE_WORKER__MODEL_ROOT=/models \
    SURGE_LOG__FORMAT=json
EXPOSE 9400
ENTRYPOINT ["surge"]
CMD ["worker", "--config", "/opt/surge/config/worker.toml"]
