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
# The image's settings: models in /models, JSON logs. Written into its config file, not set in
# the environment, which would override every field of a config file mounted in its place.
RUN sed -e 's|^model_root = "models"|model_root = "/models"|' -e 's|^format = "auto"|format = "json"|' \
        config/worker.toml > config/image.toml \
    && grep -q '^model_root = "/models"' config/image.toml && grep -q '^format = "json"' config/image.toml

EXPOSE 9400
ENTRYPOINT ["surge"]
CMD ["worker", "--config", "/opt/surge/config/image.toml"]
