# A Surge worker, on the CPU. For GPUs, build with `--build-arg EXTRAS=[gpu]` (CUDA and cuDNN
# come as wheels; the host needs the NVIDIA driver and container toolkit), and `[gpu,torch]`
# to serve PyTorch models as well.
FROM python:3.11-slim
ARG EXTRAS=""

WORKDIR /opt/surge
COPY pyproject.toml README.md ./
COPY cli cli
COPY config config
COPY schemas schemas
COPY producers producers
COPY workers workers
RUN pip install --no-cache-dir ".${EXTRAS}" && mkdir -p /models

ENV SURGE_WORKER__MODEL_ROOT=/models \
    SURGE_LOG__FORMAT=json
EXPOSE 9400
ENTRYPOINT ["surge"]
CMD ["worker", "--config", "/opt/surge/config/worker.toml"]
